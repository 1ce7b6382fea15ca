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
    add_not_taken_arguments,
    engine_config,
    engine_kwargs_from_args,
    engine_options,
)


def _add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add a `--kebab-name` flag per engine option (`batchllm run --help` lists the same ones), vLLM's flags
    that change nothing here (--disable-log-stats, --swap-space ...) and a flag per vLLM option with no counterpart
    here (`VLLM_NOT_TAKEN`: -pp, --revision, --enable-lora ...), which takes the values `LLM` takes and refuses any
    other with `batchllm run`'s explanation; returns the parser. `LLM(**vars(args))` takes every value it parses."""
    add_engine_arguments(parser)
    add_no_effect_arguments(parser.add_argument_group("vLLM options without effect here"), run_batch=False)
    add_not_taken_arguments(parser.add_argument_group("vLLM options not taken here (their defaults are accepted)"))
    return parser


def _from_cli_args(cls, args: argparse.Namespace):
    """The EngineArgs of parsed arguments (those `add_cli_args` added; others are left out). vLLM's names of options
    read back what their option was set to, as vLLM's do (`--no-enable-prefix-caching`: `enable_prefix_caching`
    False; it read None, as every flag of theirs stores under the option it means); left at its default, None."""
    kwargs, options = engine_kwargs_from_args(args), engine_options()
    given = {name: value for name, value in kwargs.items() if value != options[name].default}
    vllm_names = {key: given[name] for key, name in VLLM_ALIASES.items() if name in given}
    for key, (name, convert) in VLLM_CONVERTED.items():  # (vLLM's unit: e.g. bytes for GiB, 1 / convert(1) each)
        if name in given and convert(in_vllm_units := round(given[name] / convert(1))) == given[name]:
            vllm_names[key] = in_vllm_units  # (only where it converts back exactly: the two must mean one value)
    return cls(**kwargs, **vllm_names)


def _check(self) -> None:
    """Every value checked as LLM(...) checks it (a bad one fails here, by name); then the options vLLM's names
    (enable_prefix_caching, kv_cache_memory_bytes) mean set from them. Those names keep their values, as vLLM's
    EngineArgs reads them back (`EngineArgs(enable_prefix_caching=False).enable_prefix_caching` is False); an
    option given beside its vLLM name must mean the same (`options._vllm_names_moved`)."""
    kwargs, options = dataclasses.asdict(self), engine_options()
    moved = {key: VLLM_CONVERTED[key][0] if key in VLLM_CONVERTED else VLLM_ALIASES[key]
             for key in (*VLLM_ALIASES, *VLLM_CONVERTED) if kwargs[key] is not None}
    for name in moved.values():
        if kwargs[name] == options[name].default:  # (left at its default: the vLLM name sets it)
            del kwargs[name]
    engine_config(**kwargs)
    for key, name in moved.items():
        setattr(self, name, VLLM_CONVERTED[key][1](kwargs[key]) if key in VLLM_CONVERTED else kwargs[key])


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
