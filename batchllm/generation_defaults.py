"""A model's sampling defaults from its generation_config.json, as vLLM takes them (`--generation-config
auto`): `batchllm run` uses them where its command line sets none, and `LLM` where a call passes no
SamplingParams (`LLM.get_default_sampling_params`). Read as JSON, so the answer does not depend on the
transformers version (whose own defaults, and so `GenerationConfig.to_diff_dict`, changed in 5.0)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
"""generation_config.json field -> SamplingParams field: the sampling fields vLLM takes from the file."""


def generation_config_file(model_dir: Path | None, generation_config: str = "auto") -> Path | None:
    """The generation_config.json `generation_config` (vLLM's option) names, or None where there is none:
    "auto" and "vllm" the model's (vllm takes no sampling defaults from it, but still its EOS ids, as
    vLLM does), another value a folder holding one (a ValueError naming it when it holds none)."""
    if generation_config not in ("auto", "vllm"):
        folder = Path(generation_config).expanduser()
        if not (folder / "generation_config.json").is_file():
            raise ValueError(f"generation_config {generation_config!r}: no generation_config.json there "
                             "(auto: the model's; vllm: none)")
        return folder / "generation_config.json"
    path = None if model_dir is None else Path(model_dir) / "generation_config.json"
    return path if path is not None and path.is_file() else None


class _NotJson(ValueError):
    """A generation_config.json whose text is not JSON (empty, cut short)."""


def _read(path: Path) -> dict[str, Any]:
    """The file's JSON object; ValueError naming the file where it cannot be read (`_NotJson` where its text is
    not JSON) or is no JSON object."""
    try:
        text = path.read_text()
    except (OSError, ValueError) as e:  # (ValueError: not UTF-8)
        raise ValueError(f"cannot read {str(path)!r}: {e}") from e
    try:
        config = json.loads(text)
    except ValueError as e:
        raise _NotJson(f"{str(path)!r} is not JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object")
    return config


def generation_config_json(model_dir: Path | None, generation_config: str = "auto") -> dict[str, Any] | None:
    """The JSON object of the file `generation_config_file` picks ("vllm": the model's); None without one or where its
    text is not JSON; a file that cannot be read or is no JSON object is a ValueError naming it."""
    path = generation_config_file(model_dir, generation_config)
    try:
        return None if path is None else _read(path)
    except _NotJson:
        return None


def model_sampling_defaults(model_dir: Path | None, generation_config: str = "auto") -> dict[str, Any]:
    """The SamplingParams fields a model's generation_config.json sets (non-null fields of
    GENERATION_CONFIG_FIELDS; Qwen3: temperature 0.6, top_p 0.95, top_k 20), from the file
    `generation_config_file` picks ("vllm": none). {} without the file or the directory, and, with a warning,
    where the file is not JSON (vLLM falls back from it to config.json, which sets no sampling defaults: it failed
    the model here); a missing folder, a file that is not a JSON object, or a value SamplingParams refuses is a
    ValueError naming it (vLLM fails on those too)."""
    path = generation_config_file(model_dir, generation_config)
    if path is None or generation_config == "vllm":
        return {}
    try:
        config = _read(path)
    except _NotJson as e:
        logger.warning("%s: no sampling defaults are taken from it, as vLLM falls back from it", e)
        return {}
    defaults = {ours: config[theirs] for theirs, ours in GENERATION_CONFIG_FIELDS.items()
                if config.get(theirs) is not None}
    from batchllm.sampling_params import SamplingParams

    try:
        SamplingParams(**defaults)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{str(path)!r} sets a sampling default SamplingParams refuses: {e}") from e
    return defaults


def generation_eos_token_ids(model_dir: Path | None, generation_config: str = "auto") -> list[int]:
    """The eos_token_id(s) of the generation_config.json `generation_config_file` picks ([] without one, or
    where the file cannot be read: `model_sampling_defaults` names that problem where it matters)."""
    ids = _generation_file_eos_ids(model_dir, generation_config)
    return [] if ids is None else ids


def ending_eos_token_ids(model_dir: Path | None, generation_config: str, config_eos_ids: Iterable[int]) -> set[int]:
    """The model's EOS ids that end a request, besides the tokenizer's, as vLLM picks them: those of the
    generation_config.json `generation_config_file` picks where there is a readable one, else config.json's
    (`config_eos_ids`; transformers' `GenerationConfig.from_model_config` fallback, which vLLM uses too)."""
    ids = _generation_file_eos_ids(model_dir, generation_config)
    return set(config_eos_ids) if ids is None else set(ids)


def request_ending_eos_ids(model_dir: Path | None, generation_config: str, config_eos_ids: Iterable[int],
                           tokenizer: Any) -> frozenset[int]:
    """Every id that ends a request: `ending_eos_token_ids`' and the tokenizer's EOS (None: no tokenizer). One rule
    for the engine, the line reader's checks and Ray's CPU stage, so each refuses and ends the same requests."""
    ids = ending_eos_token_ids(model_dir, generation_config, config_eos_ids)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _generation_file_eos_ids(model_dir: Path | None, generation_config: str) -> list[int] | None:
    """The integer eos_token_id(s) of the picked generation_config.json; None without a readable one."""
    try:
        path = generation_config_file(model_dir, generation_config)
        if path is None:
            return None
        eos = _read(path).get("eos_token_id")
    except ValueError:
        return None
    ids = eos if isinstance(eos, list) else [eos]
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
