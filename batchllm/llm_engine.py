"""What vLLM scripts read from a built `LLM` besides generating: `llm.model_config` (the model the engine
runs: its context, dtype, shapes, sampling defaults) and `llm.llm_engine` (its tokenizer, model config and
unfinished-request count, of vLLM's `LLMEngine`). Views, made once per LLM from what it resolved while building:
read-only (the engine is built from its EngineConfig; nothing here changes it)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchllm.config import EngineConfig
from batchllm.generation_defaults import model_sampling_defaults
from batchllm.models.spec import RUNS_NO_CODE, ModelLoadError, ModelSpec


@dataclass(frozen=True)
class RunningModelConfig:
    """vLLM's `ModelConfig` as scripts read it: the values the engine runs with, every automatic one
    resolved (`max_model_len` the model's own where none was asked, `dtype` a torch dtype, `seed` the one
    drawn where None was given)."""

    model: str
    """The model as given (a directory or a cached Hugging Face id), or the default model's directory."""
    model_dir: Path
    tokenizer: str
    max_model_len: int
    dtype: torch.dtype
    quantization: str | None
    """The FP8 method the decoder's linear layers run ("fp8", or "compressed-tensors" for such a
    checkpoint), None without one."""
    seed: int
    max_logprobs: int
    generation_config: str
    skip_tokenizer_init: bool
    enforce_eager: bool
    trust_remote_code: bool
    tensor_parallel_size: int
    spec: ModelSpec
    """BatchLLM's reading of the model's config.json."""
    tokenizer_mode: str = "auto"
    runner_type: str = "generate"
    is_multimodal_model: bool = False
    is_encoder_decoder: bool = False

    @property
    def served_model_name(self) -> str:
        return self.model

    @property
    def architecture(self) -> str:
        return self.spec.architecture

    @property
    def architectures(self) -> list[str]:
        return [self.spec.architecture]

    @property
    def is_quantized(self) -> bool:
        return self.quantization is not None

    @functools.cached_property
    def hf_config(self):
        """The model's config.json as transformers reads it (loaded on first use), never running code of the
        model directory (trust_remote_code=False: a config class of its own is a ModelLoadError)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.model_dir, trust_remote_code=False)
        except ValueError as e:
            if "trust_remote_code" not in str(e):
                raise
            raise ModelLoadError(f"cannot read {self.model_dir / 'config.json'} with transformers: its auto_map "
                                 f"names a config class of the directory's own code; {RUNS_NO_CODE}") from e

    @property
    def hf_text_config(self):
        return self.hf_config

    def get_vocab_size(self) -> int:
        return self.spec.vocab_size

    def get_hidden_size(self) -> int:
        return self.spec.hidden_size

    def get_head_size(self) -> int:
        return self.spec.head_dim

    def get_sliding_window(self) -> int | None:
        return self.spec.sliding_window

    def get_total_num_hidden_layers(self) -> int:
        return self.spec.num_layers

    def get_num_layers(self, parallel_config: Any = None) -> int:
        """The decoder layers (every rank runs all of them: there is no pipeline parallelism)."""
        return self.spec.num_layers

    def get_total_num_kv_heads(self) -> int:
        return self.spec.num_kv_heads

    def get_num_kv_heads(self, parallel_config: Any = None) -> int:
        """One tensor-parallel rank's key/value heads (at least one: a head is replicated over ranks
        that outnumber the heads); `parallel_config` (vLLM's argument): any object with a
        tensor_parallel_size, None for this engine's."""
        return max(1, self.spec.num_kv_heads // self._tp_size(parallel_config))

    def get_num_attention_heads(self, parallel_config: Any = None) -> int:
        """One tensor-parallel rank's query heads (`get_num_kv_heads` on `parallel_config`), as vLLM floors them."""
        return self.spec.num_heads // self._tp_size(parallel_config)

    def _tp_size(self, parallel_config: Any) -> int:
        if parallel_config is None:
            return self.tensor_parallel_size
        return int(getattr(parallel_config, "tensor_parallel_size", 1))

    def try_get_generation_config(self) -> dict[str, Any]:
        """vLLM's: the non-default fields of the generation config `generation_config` names (the model's for "auto"
        and "vllm", else that folder's), as transformers' `GenerationConfig.to_diff_dict` gives them. Where the model
        has none (or its text is not JSON), as vLLM, the one transformers derives from its config.json (its BOS, EOS
        and pad ids); {} where neither can be read."""
        from transformers import AutoConfig, GenerationConfig

        from batchllm.generation_defaults import generation_config_json

        if (config := generation_config_json(self.model_dir, self.generation_config)) is not None:
            return GenerationConfig.from_dict(config).to_diff_dict()  # ({}: transformers' defaults, as vLLM's)
        if self.generation_config not in ("auto", "vllm"):
            return {}
        try:
            return GenerationConfig.from_model_config(AutoConfig.from_pretrained(
                self.model_dir, trust_remote_code=False)).to_diff_dict()
        except (OSError, ValueError):
            return {}

    def get_diff_sampling_param(self) -> dict[str, Any]:
        """The sampling fields the model's generation_config.json sets (as `LLM.get_default_sampling_params`
        takes them; {} with generation_config "vllm")."""
        return model_sampling_defaults(self.model_dir, self.generation_config)


def running_model_config(config: EngineConfig, model_dir: Path, spec: ModelSpec, max_model_len: int,
                         dtype: torch.dtype, quantization_method: str | None) -> RunningModelConfig:
    mc = config.model
    model = str(model_dir) if mc.model is None else str(mc.model)
    return RunningModelConfig(
        model=model, model_dir=model_dir, tokenizer=model if mc.tokenizer is None else str(mc.tokenizer),
        max_model_len=max_model_len, dtype=dtype, quantization=quantization_method, seed=mc.seed,
        max_logprobs=mc.max_logprobs, generation_config=mc.generation_config,
        skip_tokenizer_init=mc.skip_tokenizer_init, enforce_eager=mc.enforce_eager,
        trust_remote_code=mc.trust_remote_code, tensor_parallel_size=config.parallel.tensor_parallel_size,
        spec=spec)


STEP_API_REFUSAL = (
    "vLLM's LLMEngine (add_request / step) is not offered: BatchLLM plans a batch whole before running it. Build "
    "LLM.from_engine_args(engine_args) and call generate(prompts, params), or queue the requests with "
    "llm.enqueue(...) and run them with llm.wait_for_completion()")
"""What building vLLM's step engine says (`LLMEngine.from_engine_args`)."""


class LLMEngine:
    """vLLM's `llm.llm_engine` as scripts read it: the tokenizer, the model config and the count of
    unfinished requests (0 between `generate` calls: each runs its whole batch). vLLM's step API
    (`add_request` / `step`) is not offered: a batch is planned whole (`LLM.generate`)."""

    def __init__(self, llm: Any, model_config: RunningModelConfig) -> None:
        self._llm = llm
        self.model_config = model_config

    @property
    def tokenizer(self) -> Any:
        return self._llm.tokenizer

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_model_config(self) -> RunningModelConfig:
        return self.model_config

    def get_num_unfinished_requests(self) -> int:
        """Prompts queued by `enqueue` for the next `wait_for_completion`, and requests of a call still running in
        this process (one per completion of n > 1; a generator stopped part-way leaves none; with data parallelism
        the workers hold them, uncounted)."""
        engine = self._llm.engine
        running = 0 if engine is None else engine.core.scheduler.num_unfinished_requests()
        return len(self._llm._queued) + running

    def has_unfinished_requests(self) -> bool:
        return self.get_num_unfinished_requests() > 0

    @classmethod
    def from_engine_args(cls, engine_args: Any, *args: Any, **kwargs: Any) -> LLMEngine:
        """vLLM's way to build an engine driven request by request: refused by name (`STEP_API_REFUSAL`)."""
        raise NotImplementedError(STEP_API_REFUSAL)

    from_vllm_config = from_engine_args

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"llm.llm_engine.{name} is not offered: BatchLLM's llm_engine gives model_config, "
                             "get_tokenizer() and the unfinished-request counts (the engine itself is llm.engine, "
                             "its options llm.config)")
