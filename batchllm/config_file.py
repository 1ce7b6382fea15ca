"""vLLM's `--config FILE.yaml`: a command's options read from a YAML mapping, as vLLM's FlexibleArgumentParser
reads them (`vllm run-batch --config run.yaml -i in.jsonl -o out.jsonl`).

Each key is an option's long name without its dashes (`max-num-batched-tokens` or `max_num_batched_tokens`) and
becomes that flag; the flags are put right after the command's name, before the command line's own words, so a
flag also given on the command line wins (command line > file > defaults; a repeatable one, `--stop`, adds to the
file's), as in vLLM. Values, as vLLM writes them: true is the bare flag, false its `--no-` form where the command
has one (else nothing: the default), a list the flag followed by each item, a mapping its JSON text, null nothing
(the option's default: vLLM writes `None`, which its optional options read as None, their default; here the text
"None" was refused as a path, a number or a choice), anything else its text (one value written `--flag=value`,
so that a value starting with a dash stays a value).
Two keys are refused: `config` (no file names another) and `overwrite` (every run would start the job over,
losing its results where the same command should resume it). Pure functions over words; no state. PyYAML is
imported only when a file is read (transformers installs it)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
"""What vLLM reads (.yaml, .yml) and JSON, which YAML reads as it is."""


class ConfigFileError(ValueError):
    """A `--config` file that cannot be read as options; the message names the file and what is wrong."""


def add_config_file_argument(parser: argparse.ArgumentParser) -> None:
    """`--config FILE.yaml` in a command's --help. `with_config_file` reads it before argparse sees the words (so
    the parsed value is always None); listed here so that --help names it."""
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="read options from a YAML file, as vLLM's --config does: each key an option's long name "
                        "(max-num-batched-tokens: 8192, temperature: 0, stop: [a, b]); the command line's own options "
                        "win")


def with_config_file(words: list[str], flags_of: Callable[[list[str]], Mapping[str, argparse.Action]], *,
                     has_command: bool = True, vllm_flag: Callable[[str], bool] = lambda flag: False) -> list[str]:
    """`words` (the command line after the program's name, flag names already dashed) with `--config FILE` (or
    `--config=FILE`) replaced by FILE's options, put right after the first word that is no flag (the command's
    name; where `has_command` is false, a script's parser without subcommands, after the first word where that is
    no flag, else first of all, as vLLM's `_pull_args_from_config`). Words after `--` are positional and left
    alone. `words` without `--config` come back as they are.
    `flags_of(words)`: the flags of the command the words name, each to its argparse action (a false value is
    `--no-x` only where the command has that flag; a list is the flag repeated where it appends)."""
    end = words.index("--") if "--" in words else len(words)
    at = [i for i, word in enumerate(words[:end]) if word.split("=", 1)[0] == "--config"]
    if not at:
        return words
    if len(at) > 1:
        raise ConfigFileError("--config is given more than once: give one file (its options, then the command "
                              "line's, which win)")
    i = at[0]
    if "=" in words[i]:
        path, taken = words[i].split("=", 1)[1], 1
    elif i + 1 < end and not words[i + 1].startswith("-"):
        path, taken = words[i + 1], 2
    else:
        raise ConfigFileError("--config needs a file: --config FILE.yaml")
    rest = words[:i] + words[i + taken:]
    if has_command:
        command_at = next((k for k, word in enumerate(rest) if not word.startswith("-")), None)
    else:
        command_at = 0 if rest and not rest[0].startswith("-") else -1
    if command_at is None:
        raise ConfigFileError("--config needs a command: batchllm run --config FILE.yaml ...")
    flags = config_file_flags(path, flags_of(rest), vllm_flag)
    return rest[:command_at + 1] + flags + rest[command_at + 1:]


def config_file_flags(path: str, command_flags: Mapping[str, argparse.Action],
                      vllm_flag: Callable[[str], bool] = lambda flag: False) -> list[str]:
    """The flags FILE's mapping stands for (see the module's docstring), in the file's order; `vllm_flag(flag)`: a
    vLLM flag the command does not have (refused where a value is given), which a null leaves unset, as vLLM does."""
    flags: list[str] = []
    for key, value in _read_mapping(path).items():
        if not isinstance(key, str) or not key or key.startswith("-"):
            raise ConfigFileError(f"{path}: key {key!r} is not an option's name (write max-num-batched-tokens: "
                                  f"8192, without dashes)")
        if key == "config":
            raise ConfigFileError(f"{path}: a config file cannot name another (config: {value!r})")
        if key == "overwrite" and value:
            raise ConfigFileError(f"{path}: overwrite is not taken from a config file: every run with it would start "
                                  "the job over, where the same command should resume it (give --overwrite once, on "
                                  "the command line)")
        flag = "--" + key.replace("_", "-")
        try:
            flags += [] if value is None and vllm_flag(flag) else _flag_words(path, flag, value, command_flags)
        except (TypeError, ValueError, RecursionError) as error:  # (json: a circular YAML anchor, ...)
            raise ConfigFileError(f"{path}: {key} cannot be written as a flag's value: {error}") from None
    return flags


def _flag_words(path: str, flag: str, value: Any, command_flags: Mapping[str, argparse.Action]) -> list[str]:
    if value is None:
        if flag not in command_flags:
            raise ConfigFileError(f"{path}: {flag[2:]} is no option of this command (see its --help)")
        return []
    if isinstance(value, bool):
        if value:
            return [flag]
        off = "--no-" + flag[2:]
        if off not in command_flags and flag not in command_flags:  # (true would be refused by name: so is false)
            raise ConfigFileError(f"{path}: {flag[2:]} is no option of this command (see its --help)")
        return [off] if off in command_flags else []  # (vLLM's: a plain switch off is its default)
    if isinstance(value, list):
        action = command_flags.get(flag)
        if isinstance(action, argparse._AppendAction):  # (--stop a --stop b)
            return [f"{flag}={_text(item)}" for item in value]
        if action is not None and action.nargs not in ("+", "*") and value:
            raise ConfigFileError(f"{path}: {flag[2:]} takes one value, not a list ({value!r})")
        return [flag, *map(_text, value)] if value else []
    return [f"{flag}={_text(value)}"]


def _text(value: Any) -> str:
    """A value as vLLM writes it (`str`), a mapping or list as JSON (a date inside one as its ISO text)."""
    return json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)


def _read_mapping(path: str) -> dict:
    if Path(path).suffix.lower() not in CONFIG_SUFFIXES:
        raise ConfigFileError(f"--config {path}: a config file is YAML (.yaml or .yml, as vLLM's) or JSON (.json)")
    import yaml  # (lazily: only a --config run reads YAML)

    try:
        with open(path, encoding="utf-8") as file:
            config = yaml.safe_load(file)
    except OSError as error:
        raise ConfigFileError(f"--config {path}: cannot read it: {error.strerror or error}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"--config {path}: not valid YAML: {_first_line(error)}") from None
    if config is None:
        return {}  # (an empty file: no options)
    if not isinstance(config, dict):
        raise ConfigFileError(f"--config {path}: must hold a mapping of option names to values "
                              f"(max-num-batched-tokens: 8192), not a {type(config).__name__}")
    return config


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]
