"""A model's sampling defaults from its generation_config.json, as vLLM takes them (`--generation-config
auto`): `batchllm run` uses them where its command line sets none, and `LLM` where a call passes no
SamplingParams (`LLM.get_default_sampling_params`). Read as JSON, so the answer does not depend on the
transformers version (whose own defaults, and so `GenerationConfig.to_diff_dict`, changed in 5.0)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
"""generation_config.json field -> SamplingParams field: the sampling fields vLLM takes from the file."""


def model_sampling_defaults(model_dir: Path | None, generation_config: str = "auto") -> dict[str, Any]:
    """The SamplingParams fields a model's generation_config.json sets (non-null fields of
    GENERATION_CONFIG_FIELDS; Qwen3: temperature 0.6, top_p 0.95, top_k 20). `generation_config` as
    vLLM's option: "auto" reads `model_dir`'s file, "vllm" none, another value is a folder whose file is
    read. {} without the file or the directory; a missing folder, a file that is not JSON, or a value
    SamplingParams refuses is a ValueError naming it."""
    if generation_config == "vllm":
        return {}
    if generation_config != "auto":
        model_dir = Path(generation_config).expanduser()
        if not (model_dir / "generation_config.json").is_file():
            raise ValueError(f"generation_config {generation_config!r}: no generation_config.json there "
                             "(auto: the model's; vllm: none)")
    path = None if model_dir is None else Path(model_dir) / "generation_config.json"
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object")
    defaults = {ours: config[theirs] for theirs, ours in GENERATION_CONFIG_FIELDS.items()
                if config.get(theirs) is not None}
    from batchllm.sampling_params import SamplingParams

    try:
        SamplingParams(**defaults)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{str(path)!r} sets a sampling default SamplingParams refuses: {e}") from e
    return defaults
