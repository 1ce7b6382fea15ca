"""vLLM's `EngineArgs` as its example scripts use it: one field per engine option (`options.engine_options`,
each with its declared default), `add_cli_args` to put them on an argparse parser, `from_cli_args` to read them
back, and `LLM(**dataclasses.asdict(args))` or `LLM.from_engine_args(args)` to build an engine; vLLM's names of
options (`enable_prefix_caching`, `kv_cache_memory_bytes`) are fields too, moved onto the options they mean.
Values are checked when the EngineArgs is made, as `LLM` checks its keywords (`options.engine_config`)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from batchllm.options import (
    VLLM_ALIASES,
    VLLM_CONVERTED,
    VLLM_NO_EFFECT,
    VLLM_NOT_TAKEN,
    add_engine_arguments,
    add_no_effect_arguments,
    engine_config,
    engine_kwargs_from_args,
    engine_options,
)


def _add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add a `--kebab-name` flag per engine option (`batchllm run --help` lists the same ones) and vLLM's flags
    that change nothing here (--disable-log-stats, --swap-space ...); returns the parser."""
    add_engine_arguments(parser)
    add_no_effect_arguments(parser.add_argument_group("vLLM options without effect here"), run_batch=False)
    return parser


def _from_cli_args(cls, args: argparse.Namespace):
    """The EngineArgs of parsed arguments (those `add_cli_args` added; others are left out)."""
    return cls(**engine_kwargs_from_args(args))


def _check(self) -> None:
    """vLLM's names (enable_prefix_caching, kv_cache_memory_bytes) moved onto the options they mean, then every value
    checked as LLM(...) checks it (a bad one fails here, by name)."""
    for alias, name in VLLM_ALIASES.items():
        if (value := getattr(self, alias)) is not None:
            setattr(self, name, value)
            setattr(self, alias, None)
    for key, (name, convert) in VLLM_CONVERTED.items():
        if (value := getattr(self, key)) is not None:
            setattr(self, name, convert(value))
            setattr(self, key, None)
    engine_config(**dataclasses.asdict(self))


def _engine_args_class() -> type:
    fields = [(option.name, Any, dataclasses.field(default=option.default)) for option in engine_options().values()]
    fields += [(name, Any, dataclasses.field(default=None)) for name in (*VLLM_ALIASES, *VLLM_CONVERTED)]
    # vLLM's fields with no counterpart here, at the defaults engine_config takes (else refused by name, as LLM's)
    fields += [(name, Any, dataclasses.field(default=no_effect.values[0] if no_effect.values else None))
               for name, no_effect in VLLM_NO_EFFECT.items() if not no_effect.run_batch_only]
    fields += [(name, Any, dataclasses.field(default=accepted[0])) for name, (accepted, _) in VLLM_NOT_TAKEN.items()]
    return dataclasses.make_dataclass(
        "EngineArgs", fields, namespace={"add_cli_args": staticmethod(_add_cli_args),
                                         "from_cli_args": classmethod(_from_cli_args), "__post_init__": _check,
                                         "__doc__": __doc__, "__module__": __name__})


EngineArgs = _engine_args_class()
