"""ModelSpec: what the engine needs to know about a checkpoint, read from its config.json.

Reads the raw JSON (not transformers' config classes) so that old- and new-style keys both work:
`rope_theta`/`rope_scaling` (transformers 4) and `rope_parameters` (transformers 5).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # quant_config imports this module (ModelLoadError)
    from batchllm.models.quant_config import Fp8Scheme


logger = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """The model directory or its config cannot be used; the message says why."""

ARCHITECTURE_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
"""config.json's model_type -> its architecture, for configs that name no architectures."""


_CLASS_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 131072, "num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "sliding_window": 4096},
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128, "sliding_window": 4096},
}
"""transformers' config classes' defaults, by model_type, of the keys read here whose default is a value (LlamaConfig's
max_position_embeddings 2048, MistralConfig's num_key_value_heads 8 and sliding_window 4096, Qwen3Config's head_dim
128 ...): what a config.json without the key has in transformers, and so in vLLM, which reads transformers' config
object. A key not listed defaults to None there (num_key_value_heads: the head count; head_dim: hidden size over
heads)."""

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
"""The config keys vLLM 0.26 derives a model's context from (`derive_max_model_len_and_key`), in its order."""

DEFAULT_CONTEXT = 2048
"""vLLM's context for a config that sets none of CONTEXT_KEYS (`_get_and_verify_max_len`, with a warning)."""

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""The rope_scaling types the rotary embedding computes (`layers.rotary`)."""


def rope_type_of(scaling: dict | None) -> str:
    """A rope_scaling's type under either key (`rope_type`, transformers 4.45+; `type` before), default without one."""
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


@dataclass(frozen=True)
class ArchitectureTraits:
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    """Qwen3: RMSNorm over each head of q and k before rotary."""
    mlp_bias: bool = False


def _attention_bias(cfg: dict, qk_norm: bool = False) -> ArchitectureTraits:
    bias = bool(cfg.get("attention_bias", False))
    return ArchitectureTraits(qkv_bias=bias, o_bias=bias, qk_norm=qk_norm)


def _llama_traits(cfg: dict) -> ArchitectureTraits:
    """Llama's, and Mistral's (vLLM's Mistral is its Llama): both bias keys."""
    return replace(_attention_bias(cfg), mlp_bias=bool(cfg.get("mlp_bias", False)))


SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": _llama_traits,
    "MistralForCausalLM": _llama_traits,
    "Qwen2ForCausalLM": lambda cfg: ArchitectureTraits(qkv_bias=True, o_bias=False),
    "Qwen3ForCausalLM": lambda cfg: _attention_bias(cfg, qk_norm=True),
}
"""Each architecture's biases and norms as its model reads them from config.json: Qwen2 and Qwen3 have no MLP bias
whatever mlp_bias says, as in transformers and vLLM (a config that sets it loads without); Mistral reads both keys
as Llama does, as vLLM's (transformers' Mistral has no bias at all: a checkpoint with none loads the same)."""


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    traits: ArchitectureTraits
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    context: tuple[int, str]
    """(the model's context, the config key it comes from) as vLLM derives it before rope scaling (`derive_context`);
    `inputs.resolve_max_model_len` scales and caps it."""
    tie_word_embeddings: bool
    mlp_bias: bool
    sliding_window: int | None
    checkpoint_dtype: str | None
    config_eos_token_ids: tuple[int, ...]
    quantization: Fp8Scheme | None = None
    """The checkpoint's FP8 scheme (`quant_config.Fp8Scheme`) from its quantization_config; None: 16/32-bit."""

    @property
    def layer_linear_parameters(self) -> int:
        """Weights of one layer's linear layers: the attention projections and the gated MLP."""
        attention = self.hidden_size * (2 * self.num_heads + 2 * self.num_kv_heads) * self.head_dim  # q, k, v, o
        mlp = 3 * self.hidden_size * self.intermediate_size  # gate, up, down
        return attention + mlp

    @property
    def num_parameters(self) -> int:
        """The decoder's weights, counted from the shapes: embedding, every layer's linear layers,
        and an LM head of its own unless tied (norms and biases left out)."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_linear_parameters + embeddings

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token across all layers, per byte of element size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


RUNS_NO_CODE = ("BatchLLM runs no code from model directories (--trust-remote-code, trust_remote_code=True, does "
                "not change that: it is accepted for vLLM's scripts and ignored)")
"""Said wherever a model or tokenizer directory would need its own Python code: every transformers `from_pretrained`
BatchLLM makes passes trust_remote_code=False, so such code is neither run nor asked about (transformers' prompt)."""


def _read_config(model_dir: Path) -> tuple[Path, dict]:
    """(the path of model_dir's config.json, its JSON object); anything else is a ModelLoadError
    naming the directory or file."""
    if not model_dir.exists():
        raise ModelLoadError(f"model directory {str(model_dir)!r} does not exist")
    if not model_dir.is_dir():
        raise ModelLoadError(f"model path {str(model_dir)!r} is not a directory")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        ggufs = sorted(p.name for p in model_dir.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        hint = "" if not ggufs else (
            f"; it holds {'GGUF files' if len(ggufs) > 1 else 'a GGUF file'} ({', '.join(ggufs[:5])}"
            f"{', ...' * (len(ggufs) > 5)}): "
            f"give the file as the model, as in --model {str(model_dir / ggufs[0])!r}")
        raise ModelLoadError(f"{str(model_dir)!r} has no config.json: not a Hugging Face model directory{hint}")
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read {config_path}: {e}") from e
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{config_path} does not hold a JSON object")
    return config_path, cfg


_ROPE_REQUIRED_KEYS = {"default": (), "linear": ("factor",), "yarn": ("factor",),
                       "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
"""The keys transformers 5 requires of each rope type (`RotaryEmbeddingConfigMixin._validate_<type>_rope_parameters`)
beyond those its `standardize_rope_params` fills: rope_type, rope_theta, original_max_position_embeddings."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float))


def _rope_source(cfg: dict, config_path: Path) -> tuple[str, dict]:
    """(its key, the dict) transformers 5 reads the rope from: a non-empty rope_scaling (transformers 4's key) over
    rope_parameters (`convert_rope_params_to_dict`: `rope_scaling or self.rope_parameters`); {} without either. One
    that is not a JSON object is a ModelLoadError."""
    where = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    source = cfg.get(where) or {}
    if not isinstance(source, dict):
        raise ModelLoadError(f"{config_path}: {where} must be a JSON object, not {source!r}")
    return where, source


def _rope_theta(cfg: dict, config_path: Path) -> float:
    """The rope's base as transformers 5 resolves it: the rope dict's rope_theta when it has the key (even null), else
    the top-level one, else 10000 (`rope_parameters.setdefault("rope_theta", rope_theta)`: the dict's wins). A null
    or non-number one is a ModelLoadError (transformers fails on it when it builds the rotary embedding)."""
    where, source = _rope_source(cfg, config_path)
    if "rope_theta" in source:
        theta, where = source["rope_theta"], f"{where}.rope_theta"
    else:
        theta, where = cfg.get("rope_theta", 10000.0), "rope_theta"
    if not _is_number(theta):
        raise ModelLoadError(f"{config_path}: {where} must be a number, not {theta!r}")
    return float(theta)


def _original_context(scaling: dict, cfg: dict, where: str, config_path: Path) -> int | float:
    """A llama3 or yarn rope's original (pre-scaling) context as transformers 5 resolves it: a top-level
    original_max_position_embeddings (even null) over the scaling's, over max_position_embeddings. The scaling's own
    (or that default) is what transformers' validation reads, the top-level one what its rotary embedding's build
    reads: either one null or not a number is a ModelLoadError, as is, for yarn, one not positive (transformers
    divides by it and takes its log)."""
    key = "original_max_position_embeddings"
    own = scaling.get(key, transformers_max_position_embeddings(cfg))
    read = [(own, f"{where}.{key}")] + ([(cfg[key], key)] if key in cfg else [])
    positive = rope_type_of(scaling) == "yarn"
    for value, name in read:
        if not _is_number(value) or (positive and value <= 0):
            raise ModelLoadError(f"{config_path}: {name} must be a {'positive ' if positive else ''}number, "
                                 f"not {value!r}")
    return read[-1][0]


def transformers_value(cfg: dict, key: str):
    """config.json's `key` as transformers' config object holds it: the file's value where it has the key (even
    null), else the config class's default (`_CLASS_DEFAULTS`, by model_type, else by the architecture it names;
    None where the class has none)."""
    if key in cfg:
        return cfg[key]
    model_type = cfg.get("model_type")
    if model_type not in _CLASS_DEFAULTS:
        by_architecture = {arch: kind for kind, arch in ARCHITECTURE_OF_MODEL_TYPE.items()}
        model_type = next((by_architecture[a] for a in named_architectures(cfg) if a in by_architecture), None)
    return _CLASS_DEFAULTS.get(model_type, {}).get(key)


def transformers_max_position_embeddings(cfg: dict):
    """config.json's max_position_embeddings as transformers holds it (`transformers_value`), DEFAULT_CONTEXT for a
    model type it has no default for."""
    value = transformers_value(cfg, "max_position_embeddings")
    return DEFAULT_CONTEXT if value is None and "max_position_embeddings" not in cfg else value


def derive_context(cfg: dict, config_path: Path) -> tuple[int, str]:
    """(the model's context, the key it comes from) as vLLM 0.26 derives it before rope scaling
    (`derive_max_model_len_and_key`, then `_get_and_verify_max_len`): the smallest of the CONTEXT_KEYS set (not
    null; max_position_embeddings as transformers holds it, `transformers_max_position_embeddings`), a truthy
    model_max_length over all of them (Command-R's), and DEFAULT_CONTEXT, with a warning, where none is set. A value
    that is not a positive number is a ModelLoadError naming its key."""
    context, key = float("inf"), None
    for name in CONTEXT_KEYS:
        value = transformers_max_position_embeddings(cfg) if name == "max_position_embeddings" else cfg.get(name)
        if value is None:
            continue
        if not _is_number(value) or isinstance(value, bool) or value < 1:
            raise ModelLoadError(f"{config_path}: {name} must be a positive number, not {value!r}")
        if value < context:
            context, key = value, name
    if cfg.get("model_max_length"):  # (vLLM: Command-R's key wins, larger or not)
        context, key = cfg["model_max_length"], "model_max_length"
    if key is None:
        logger.warning("%s sets none of %s: assuming a context of %d tokens, as vLLM does", config_path,
                       ", ".join(CONTEXT_KEYS), DEFAULT_CONTEXT)
        return DEFAULT_CONTEXT, "vLLM's default"
    return int(context), key


def _checked_rope_scaling(cfg: dict, config_path: Path) -> dict | None:
    """The rope scaling the rotary embedding computes (None: the default rope of rope_parameters, or none), checked
    and completed before anything is written or loaded, as transformers 5 checks and completes it: a type the rotary
    embedding does not compute, a key transformers requires (_ROPE_REQUIRED_KEYS) missing, null or not a number, is
    a ModelLoadError. Invariant: the dict returned (a copy) holds, as numbers, every key `layers.rotary` reads for
    its type: a llama3 or yarn one its original context (`_original_context`), a yarn one's null factor resolved
    to max_position_embeddings over that original."""
    where, source = _rope_source(cfg, config_path)
    scaling = source if where == "rope_scaling" or rope_type_of(source) != "default" else None
    if (rope_type := rope_type_of(scaling)) not in ROPE_TYPES:
        raise ModelLoadError(f"{config_path}: rope_scaling type {rope_type!r} is not supported "
                             f"({', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return scaling
    if missing := [key for key in _ROPE_REQUIRED_KEYS[rope_type] if key not in scaling]:
        raise ModelLoadError(f"{config_path}: the {rope_type} rope in {where} lacks {', '.join(missing)} "
                             f"(transformers requires it too)")
    scaling = dict(scaling)
    if rope_type in ("llama3", "yarn"):
        scaling["original_max_position_embeddings"] = _original_context(scaling, cfg, where, config_path)
    if rope_type == "yarn" and scaling["factor"] is None:
        scaling["factor"] = int(transformers_max_position_embeddings(cfg)) / scaling["original_max_position_embeddings"]
    for key in _ROPE_REQUIRED_KEYS[rope_type]:
        if not _is_number(scaling[key]):
            raise ModelLoadError(f"{config_path}: {where}.{key} must be a number, not {scaling[key]!r}")
    return scaling


def _check_full_rotary(cfg: dict, config_path: Path) -> None:
    """The whole head is rotated here: a `partial_rotary_factor` other than 1 (top level, or in the rope dict) is a
    ModelLoadError. transformers' Llama, Mistral and Qwen models do not run one either (their default rope ignores
    it, the scaled ones then fail on the shapes), and vLLM rotates part of the head: no answer to match."""
    where, source = _rope_source(cfg, config_path)
    for key, value in (("partial_rotary_factor", cfg.get("partial_rotary_factor")),
                       (f"{where}.partial_rotary_factor", source.get("partial_rotary_factor"))):
        if value is not None and value != 1:
            raise ModelLoadError(f"{config_path}: {key} {value!r} is not supported (the whole head is rotated "
                                 f"here)")


def sliding_window_of(arch: str, cfg: dict) -> int | None:
    """The attention window, where transformers' model of `arch` slides any layer (None where none slides):
    Mistral and Llama slide every layer where the config gives a window (their models ignore `layer_types`);
    Qwen2 and Qwen3 only with `use_sliding_window`, the layers its `layer_types` name sliding, or without them
    from layer `max_window_layers` (default 28) on."""
    window = transformers_value(cfg, "sliding_window")
    if not window:
        return None
    if not arch.startswith("Qwen"):
        return int(window)
    if not cfg.get("use_sliding_window", False):
        return None
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list):
        slides = "sliding_attention" in layer_types
    else:
        slides = int(cfg.get("max_window_layers", 28)) < int(cfg["num_hidden_layers"])
    return int(window) if slides else None


def named_architectures(cfg: dict) -> list:
    """config.json's architectures as a list: one name given as a string is that name (it was walked letter by
    letter, and refused while named as supported); a config without them (e.g. one saved from a bare LlamaConfig)
    is read by its model_type, as transformers' Auto classes do."""
    architectures = cfg.get("architectures")
    if isinstance(architectures, str):
        return [architectures]
    return architectures or [ARCHITECTURE_OF_MODEL_TYPE.get(cfg.get("model_type"))]


def _supported_architecture(cfg: dict, config_path: Path) -> str:
    """The first architecture config.json names (or its model_type implies) that is supported; else a ModelLoadError
    listing the supported ones (and saying that a directory's own modeling code is not run, where auto_map names it)."""
    arch = next((a for a in named_architectures(cfg) if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        auto_map = cfg.get("auto_map")
        code = (f" (its auto_map names code of the model directory, {auto_map}: {RUNS_NO_CODE})"
                if isinstance(auto_map, dict) and auto_map else "")
        raise ModelLoadError(
            f"unsupported architecture {cfg.get('architectures') or cfg.get('model_type')!r} in {config_path}; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}{code}"
        )
    return arch


def _attention_heads(cfg: dict, config_path: Path, num_heads: int, hidden: int) -> tuple[int, int]:
    """(KV heads, head dim) of `num_heads` query heads as transformers reads them: the head dim hidden_size / heads
    where none is given (a ModelLoadError where that does not divide), KV heads the query heads where none are given,
    and each KV head serving a whole group of query heads (else a ModelLoadError naming both counts)."""
    if num_heads <= 0:
        raise ModelLoadError(f"{config_path}: num_attention_heads {num_heads} must be positive")
    head_dim = transformers_value(cfg, "head_dim")
    if head_dim is None and hidden % num_heads:
        raise ModelLoadError(f"{config_path}: hidden_size {hidden} is not a multiple of num_attention_heads "
                             f"{num_heads}, and no head_dim is given")
    num_kv_heads = int(transformers_value(cfg, "num_key_value_heads") or num_heads)
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ModelLoadError(f"{config_path}: num_attention_heads {num_heads} is not a multiple of "
                             f"num_key_value_heads {num_kv_heads} (each KV head serves a whole group of heads)")
    return num_kv_heads, int(head_dim or hidden // num_heads)


def read_model_spec(model_dir: Path) -> ModelSpec:
    """The ModelSpec of a Hugging Face model directory from its config.json alone (no weights read);
    an unsupported architecture, activation or quantization_config, or a missing or malformed
    field, is a ModelLoadError naming it."""
    config_path, cfg = _read_config(model_dir)
    arch = _supported_architecture(cfg, config_path)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"{config_path}: hidden_act {act!r} is not supported (only silu)")
    from batchllm.models.quant_config import checkpoint_quantization  # it imports ModelLoadError

    quantization = checkpoint_quantization(cfg, str(config_path))
    if quantization is None and (config_path.parent / "hf_quant_config.json").exists():
        raise ModelLoadError(f"{config_path.parent / 'hf_quant_config.json'}: an NVIDIA ModelOpt quantization (its "
                             "hf_quant_config.json) is not supported; FP8 checkpoints load from config.json's "
                             "quantization_config (quant_method 'fp8' or 'compressed-tensors')")
    try:
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope_scaling = _checked_rope_scaling(cfg, config_path)
        num_kv_heads, head_dim = _attention_heads(cfg, config_path, num_heads, hidden)
        _check_full_rotary(cfg, config_path)
        sliding = sliding_window_of(arch, cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        return ModelSpec(
            architecture=arch,
            traits=(traits := SUPPORTED_ARCHITECTURES[arch](cfg)),
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(cfg, config_path),
            rope_scaling=rope_scaling,
            context=derive_context(cfg, config_path),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            mlp_bias=traits.mlp_bias,
            sliding_window=sliding,
            checkpoint_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            config_eos_token_ids=eos_ids,
            quantization=quantization,
        )
    except ModelLoadError:
        raise
    except KeyError as e:
        raise ModelLoadError(f"{config_path} lacks the field {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{config_path} has a malformed field: {e}") from e


def weight_files(model_dir: Path) -> list[Path]:
    """The *.safetensors files to load: those `model.safetensors.index.json` names where there is one (Mistral's
    repositories ship a `consolidated.safetensors` of other names beside the shards, as vLLM's loader knows), else
    every one in the directory. None, or a file the index names missing, is a ModelLoadError naming what is there."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            names = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{str(index_path)!r} is not a safetensors index (no weight_map of file names): "
                                 f"{e}") from e
        if missing := [name for name in names if not (model_dir / name).is_file()]:
            raise ModelLoadError(f"{str(model_dir)!r} lacks weight file(s) its {index_path.name} names: "
                                 f"{', '.join(missing[:5])}")
        return [model_dir / name for name in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if bins := sorted(p.name for p in model_dir.glob("*.bin") if p.name != "training_args.bin"):
        raise ModelLoadError(f"{str(model_dir)!r} holds PyTorch weights ({', '.join(bins[:3])}), not *.safetensors, "
                             "which this engine reads: save the model again with transformers' save_pretrained "
                             "(safetensors is its default)")
    raise ModelLoadError(
        f"{str(model_dir)!r} holds no *.safetensors weights (use load_format='dummy' for random weights)"
    )
