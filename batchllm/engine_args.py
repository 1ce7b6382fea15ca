"""vLLM's `EngineArgs` as its example scripts use it: one field per engine option (`options.engine_options`,
each with its declared default), `add_cli_args` to put them on an argparse parser, `from_cli_args` to read them
back, and `LLM(**dataclasses.asdict(args))` or `LLM.from_engine_args(args)` to build an engine. Values are checked
when the EngineArgs is made, as `LLM` checks its keywords (`options.engine_config`)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from batchllm.options import add_engine_arguments, engine_config, engine_kwargs_from_args, engine_options


def _add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add a `--kebab-name` flag per engine option (`batchllm run --help` lists the same ones); returns the parser."""
    add_engine_arguments(parser)
    return parser


def _from_cli_args(cls, args: argparse.Namespace):
    """The EngineArgs of parsed arguments (those `add_cli_args` added; others are left out)."""
    return cls(**engine_kwargs_from_args(args))


def _check(self) -> None:
    engine_config(**dataclasses.asdict(self))  # a bad value fails here, by name, as LLM(...) would


def _engine_args_class() -> type:
    fields = [(option.name, Any, dataclasses.field(default=option.default)) for option in engine_options().values()]
    return dataclasses.make_dataclass(
        "EngineArgs", fields, namespace={"add_cli_args": staticmethod(_add_cli_args),
                                         "from_cli_args": classmethod(_from_cli_args), "__post_init__": _check,
                                         "__doc__": __doc__, "__module__": __name__})


EngineArgs = _engine_args_class()
