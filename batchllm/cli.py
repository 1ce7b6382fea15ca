"""`batchllm run INPUT.jsonl -o OUTPUT.jsonl`: a whole batch job; `batchllm plan INPUT.jsonl`: its
prefix-sharing plan, without the model.

Exit status: 0 when every line succeeded, 1 when some lines failed (each has an error record in the
output, or for OpenAI Batch lines in the errors file), 2 when the job could not start (unreadable
input, bad model path, bad option, damaged output) or its results could not be written (disk full),
3 on an unexpected failure (one `batchllm: error:` line; the traceback with --debug (run, plan) or
BATCHLLM_LOG_LEVEL=DEBUG), 130 / 143 when SIGINT / SIGTERM stopped it (finished lines are kept: the
same command resumes, without --overwrite where it had one (`_Job.rerun_hint`); a second signal during the stop ends
it at once, with the same statuses).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from batchllm.bench import add_bench_parser, bench_command
from batchllm.config import DTYPE_ALIASES, default_log_level, log_level_problem, unread_vllm_variables
from batchllm.config_file import ConfigFileError, add_config_file_argument, with_config_file
from batchllm.generation_defaults import generation_eos_token_ids, model_sampling_defaults
from batchllm.inputs import ModelSource, check_model_files, read_chat_template, read_model_source
from batchllm.io.ingest import (
    ENDPOINT_DEFAULTS,
    MODEL_FOR_CHAT,
    OPENAI_MAX_TOKENS,
    OPENAI_MAX_TOKENS_CAP,
    TO_THE_CONTEXT,
    LineServing,
    ResponseShape,
    count_input_lines,
    input_problem,
    prepare_lines,
    record_for,
    sampling_fields_of,
)
from batchllm.io.job import (
    InputChanged,
    JobError,
    OutputLock,
    OutputWriteError,
    ResultWriter,
    ResumeState,
    claim_errors_file,
    default_errors_path,
    is_standard_input,
    later_write_problem,
    prepare_output,
    recorded_option,
    refuse_output_onto_input,
    refuse_unusable_file_names,
    same_file,
    state_path_for,
    stream_words,
)
from batchllm.io.jsonl import encodable_as_utf8
from batchllm.io.reasoning import REASONING_PARSERS, check_tokenizer
from batchllm.io.tool_parsers import TOOL_PARSERS, ToolParserError
from batchllm.io.tool_parsers import check_tokenizer as check_tool_parser_tokenizer
from batchllm.models.default_model import default_model_path
from batchllm.models.quant_config import resolve_quantization
from batchllm.options import (
    VLLM_NOT_TAKEN,
    VLLM_SHORT_FLAGS,
    DefaultsHelpFormatter,
    add_engine_arguments,
    add_vllm_arguments,
    bare_flags_as_on,
    dashed_flag_names,
    engine_config,
    engine_kwargs_from_args,
    not_taken_hint,
)
from batchllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_LINES_FAILED, EXIT_CANNOT_START, EXIT_UNEXPECTED = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' too), abbreviations allowed as vLLM's FlexibleArgumentParser allows them
    (it keeps argparse's allow_abbrev: `--max-model 4096` is --max-model-len where no other flag begins so, and a
    flag's full name is always itself, `--model` beside `--model-impl`); an abbreviation that begins several flags is
    refused with a clear message (`ambiguous_abbreviation`) instead of argparse's bare list of vLLM's flags."""

    def error(self, message: str):
        match = re.fullmatch(r"ambiguous option: (-[^=\s]+)(?:=.*)? could match (.*)", message, re.S)
        if match is not None:
            message = ambiguous_abbreviation(self, match[1], match[2].split(", "))
        super().error(message)


def ambiguous_abbreviation(command: argparse.ArgumentParser, word: str, flags: list[str], shown: int = 8) -> str:
    """What `word`, an abbreviation that begins each of `flags`, could mean and what to do: the command's flags its
    --help lists first (then vLLM's taken only at their defaults), at most `shown` of them."""
    hidden = {flag for action in command._actions if action.help == argparse.SUPPRESS for flag in action.option_strings}
    ordered = sorted(flags, key=lambda flag: (flag in hidden, flag))
    more = f" and {len(ordered) - shown} more" if len(ordered) > shown else ""
    return (f"ambiguous option: {word} could match {', '.join(ordered[:shown])}{more}: write the whole flag "
            "(an abbreviation is taken only where it begins one flag, as on vLLM's command line)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchllm", description="Offline, throughput-first LLM batch inference with prefix sharing.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    _add_plan_parser(sub)
    add_bench_parser(sub)
    return parser


def _add_run_parser(sub) -> None:
    run = sub.add_parser(
        "run",
        aliases=["run-batch"],  # vLLM's `vllm run-batch -i IN -o OUT`: the same command, options and messages
        help="run a JSONL batch file (run-batch: the same, as vLLM spells it)",
        formatter_class=DefaultsHelpFormatter,
        description="Run every request of a JSONL file and write one result line per input line "
        "(in completion order; match them by id). Input lines: "
        '{"id": ..., "prompt": "..."} | {"id": ..., "messages": [...]} | {"id": ..., "prompt_token_ids": [...]}, '
        "each optionally with sampling fields (max_tokens, temperature, top_p, top_k, min_p, stop, "
        "stop_token_ids, seed, n, min_tokens, ignore_eos, logprobs, ...) that override the options below.",
    )
    run.set_defaults(command="run")  # (argparse stores the name typed: run-batch is `run` to everything after)
    _add_input_arguments(run)
    run.add_argument("-o", "--output", "--output-file", action=_PathAsGiven, required=True,
                     help="output JSONL file; if it exists for the same input, the job resumes where it stopped")
    run.add_argument("--overwrite", action="store_true", help="start over even if the output already holds results")
    run.add_argument("--errors-file", type=Path, default=None,
                     help="where failed OpenAI Batch lines go, as OpenAI's Batch API returns them (default: the "
                     "output's name with .errors: out.jsonl -> out.errors.jsonl, results -> results.errors; "
                     "created only when a line fails); failed plain lines stay in the output")
    s = run.add_argument_group("sampling defaults (a line's own fields take precedence)")
    model_or = "the model's generation_config.json if it sets one, else"
    # (--generation-config, an engine option below, says where the model's defaults come from)
    s.add_argument("--max-tokens", type=int, default=None,
                   help=f"most tokens to generate per request (default: for plain lines {model_or} 256; for "
                        "OpenAI Batch lines 16 in completions, and in chat the model's generation_config.json's, "
                        "else up to the context, as OpenAI's API and vLLM's server)")
    s.add_argument("--temperature", type=float, default=None, help=f"0 = greedy (default: {model_or} 1.0)")
    s.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling mass (default: {model_or} 1.0: off)")
    s.add_argument("--top-k", type=int, default=None,
                   help=f"keep the k most likely tokens (default: {model_or} 0: off)")
    s.add_argument("--min-p", type=float, default=None,
                   help=f"drop tokens below min_p x the top probability (default: {model_or} 0.0)")
    s.add_argument("--repetition-penalty", type=float, default=None,
                   help="tokens of the prompt or the output: positive logits divided by it, negative ones multiplied "
                   "(default: the model's generation_config.json if it sets one, else 1.0: off)")
    s.add_argument("--stop", action="append", type=utf8_text, default=None, help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="generate past EOS up to max tokens")
    s.add_argument("--seed", type=int, default=None,
                   help="seed: lines without their own seed get one derived from this and their id, "
                   "so sampled outputs are reproducible line by line (also the engine's seed)")
    _add_output_arguments(run.add_argument_group("output"))
    _add_tool_call_arguments(run.add_argument_group("tool calls (vLLM's flags)"))
    add_engine_arguments(run, exclude=["seed"])  # --seed above seeds the lines and the engine
    add_vllm_arguments(run, run_batch=True)  # --disable-log-stats, -pp 1, --task generate ...: bench's too
    r = run.add_argument_group("cluster (Ray Data; needs `pip install batchllm[ray]`)")
    r.add_argument("--ray", action="store_true", help="run through Ray Data; -o is then a directory of JSONL shards")
    # (None: not given, refused without --ray; `_ray_options` sets RAY_OPTION_DEFAULTS)
    r.add_argument("--num-replicas", type=int, default=None, help="engine replicas (default: 1), with --ray")
    r.add_argument("--ray-batch-size", type=int, default=None,
                   help="target rows per engine call (default: 1024), with --ray")
    r.add_argument("--ray-address", default=None,
                   help="Ray cluster address (default: a running one, else local), with --ray")


class _PathAsGiven(argparse.Action):
    """Stores a path option as a Path, and its text as given under `<dest>_as_given`: a Path drops a trailing
    slash (`-o newdir/` would be the file newdir), which says the user meant a directory (`directory_form`)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, Path(values))
        setattr(namespace, self.dest + "_as_given", values)


def directory_form(text: str | None) -> bool:
    """Whether a path as given names a directory by its form: a trailing slash, or a last part . or .."""
    return text is not None and (text.endswith(("/", os.sep, "/.", "/..")) or text in (".", ".."))


RAY_OPTION_DEFAULTS = {"num_replicas": 1, "ray_batch_size": 1024, "ray_address": None}
"""`run`'s options that only apply with --ray, and their values there when not given."""


def _ray_options(command: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`run`'s Ray options: refused by name without --ray (argparse's error, status 2: a job run without Ray
    ignored them, as a user of vLLM's argparse options does not expect), else their defaults where not given."""
    if args.ray:
        for name, default in RAY_OPTION_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
        return
    given = [f"--{name.replace('_', '-')}" for name in RAY_OPTION_DEFAULTS if getattr(args, name) is not None]
    if given:
        many = len(given) > 1
        command.error(f"{' and '.join(given)} only appl{'y' if many else 'ies'} with --ray (a Ray Data job); add "
                      f"--ray, or leave {'them' if many else 'it'} out")


def _add_output_arguments(o) -> None:
    """`run`'s options of what it writes: statistics, progress, how responses name the model, its role and its
    reasoning."""
    o.add_argument("--stats", type=Path, default=None, help="write run statistics as JSON to this file")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--served-model-name", nargs="+", type=utf8_text, default=None, metavar="NAME",
                   help="the model's names in OpenAI Batch responses (vLLM's option): a line naming one of them "
                   "gets its own name back, any other line the first (default: a line's own model field, else "
                   "--model as given, else the default model's name)")
    o.add_argument("--response-role", type=utf8_text, default="assistant",
                   help="the role of the answer's message in chat completion responses (vLLM's option)")
    o.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="OpenAI lines' logprobs name each token \"token_id:N\" in place of its text (vLLM's option; "
                   "a line's own return_tokens_as_token_ids decides for it)")
    o.add_argument("--fingerprint-mode", choices=FINGERPRINT_MODES, default="full",
                   help="the OpenAI responses' system_fingerprint, as vLLM's option: full, batchllm-<version>"
                   "[-tpN][-dpN]-<hash8 of the model, tokenizer, dtype, quantization, KV dtype and context>; hash, "
                   "without the parallelism; custom, --fingerprint-value; none, null")
    o.add_argument("--fingerprint-value", type=utf8_text, default=None,
                   help="the system_fingerprint under --fingerprint-mode custom (vLLM's option)")
    o.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="split a reasoning model's answers to OpenAI chat lines, as vLLM's option: the thinking "
                   "between <think> and </think> goes to the message's `reasoning`, the rest to its `content` "
                   "(qwen3: not where enable_thinking is off: by the line's chat_template_kwargs or reasoning_effort "
                   "none, or --default-chat-template-kwargs; and, as vLLM's, every chat line decodes with "
                   "skip_special_tokens false); default: the whole answer is content")


_FORCED_READ_AS_JSON = ('a forced tool_choice\'s answer ("required" or a named function) is constrained to JSON and '
                        "read as such, whatever the model's own call syntax")


def _add_tool_call_arguments(t) -> None:
    """vLLM's tool-calling flags (`_tool_call_options`): with both --enable-auto-tool-choice and --tool-call-parser,
    "auto" lines are served (`auto_tool_parser`); a forced choice needs no parser; --tool-parser-plugin is taken
    and not used (it would load code)."""
    t.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="vLLM's option: with --enable-auto-tool-choice, the parser of the model's own tool-call syntax "
                   "that reads the answers of \"auto\" lines (vLLM's names: "
                   f"{', '.join(TOOL_PARSERS)}); without it, not used: {_FORCED_READ_AS_JSON}")
    t.add_argument("--tool-parser-plugin", default=None, metavar="PATH",
                   help="vLLM's option (a file registering --tool-call-parser names); taken and not used: no code is "
                   "loaded from it")
    t.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="vLLM's option, with --tool-call-parser (as vLLM requires): \"auto\" lines (and an OpenAI "
                   "body's tools without a tool_choice) are answered as text which that parser reads as the message's "
                   "tool_calls and content, as vLLM's server does; without it such lines fail, each alone")


def auto_tool_parser(args: argparse.Namespace) -> str | None:
    """The parser that serves "auto" lines: --tool-call-parser where --enable-auto-tool-choice is given (vLLM uses
    no parser without it), else None (such lines fail)."""
    return args.tool_call_parser if getattr(args, "enable_auto_tool_choice", False) else None


def _tool_call_options(command: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`run`'s vLLM tool-calling flags: --enable-auto-tool-choice without --tool-call-parser, or with a parser not
    served here, is refused (argparse's error, status 2, before anything is written), as vLLM's server refuses them
    (its run-batch takes the first and answers every "auto" line as text, with no call read: a job's worth of
    answers nobody asked for); a flag
    that changes nothing here (--tool-parser-plugin; --tool-call-parser without --enable-auto-tool-choice) is noted
    on stderr, one line."""
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        command.error("--enable-auto-tool-choice requires --tool-call-parser (as vLLM's server; without one, vLLM's "
                      "run-batch would answer every \"auto\" line as text, reading no tool call)")
    if args.enable_auto_tool_choice and args.tool_call_parser not in TOOL_PARSERS:
        command.error(f"--tool-call-parser {args.tool_call_parser!r} is not served here (served: "
                      f"{', '.join(TOOL_PARSERS)}); vLLM's other parsers are not ported")
    parser_unused = args.tool_call_parser and not args.enable_auto_tool_choice
    unused = [flag for flag, value in (("--tool-call-parser", parser_unused),
                                       ("--tool-parser-plugin", args.tool_parser_plugin)) if value]
    if unused:
        print(f"batchllm: {', '.join(unused)}: taken and not used (--tool-parser-plugin loads no code here; "
              "--tool-call-parser reads \"auto\" lines only with --enable-auto-tool-choice, as in vLLM): "
              f"{_FORCED_READ_AS_JSON}; \"auto\" lines fail, each alone, without --enable-auto-tool-choice",
              file=sys.stderr)


def _add_plan_parser(sub) -> None:
    plan = sub.add_parser(
        "plan",
        help="show the prefix-sharing plan of a JSONL batch file without running the model",
        formatter_class=DefaultsHelpFormatter,
        description="Read the same input as `run`, tokenize it (no model weights are loaded) and print "
        "requests, groups, sharing degrees, prompt tokens, prefill tokens after sharing and the saving ratio "
        "1 - prefill_tokens / completion_prompt_tokens (the prompt tokens of every completion: a prompt n times). "
        "run follows this plan, but a request whose prompt and max_tokens nearly fill the KV cache (whose size plan "
        "does not know) shares its prefixes only up to their last full KV block: up to block_size - 1 tokens more "
        "each, and run warns.",
    )
    _add_input_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument("--groups", type=int, default=0, metavar="N",
                      help="also list the N prefix groups that save the most prefill (nested ones too): members, "
                      "shared prefix length in tokens, tokens saved and the prefix's first words, to check the plan "
                      "against what you know of the file")
    plan.add_argument("--max-tokens", type=int, default=None,
                      help="as run's: the max_tokens of lines without one, which a line's min_tokens and "
                      "truncate_prompt_tokens -1 are checked against (default: as run's)")
    add_engine_arguments(plan, names=["model", "tokenizer", "chat_template", "max_model_len", "max_logprobs",
                                      "plan_mode", "generation_config"])
    plan.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                      help="as run's: under qwen3 every chat line decodes with skip_special_tokens false (the plan "
                      "reads lines as run serves them)")
    plan.set_defaults(return_tokens_as_token_ids=False)  # (run's: it names tokens in records; plan writes none)
    _add_tool_call_arguments(plan.add_argument_group("tool calls (as run's: \"auto\" lines are planned where run "
                                                     "would serve them, and fail where it would not)"))


def _add_input_arguments(p: argparse.ArgumentParser) -> None:
    """The input file, positional or as `-i/--input` (vLLM's run-batch spelling; exactly one of them),
    the chat lines' default template keywords, and --debug: what `run` and `plan` share."""
    p.add_argument("input", type=Path, nargs="?", help="input JSONL file (or -i)")
    p.add_argument("-i", "--input", "--input-file", type=Path, dest="input_option", metavar="INPUT", default=None,
                   help="input JSONL file, as vLLM's run-batch spells it")
    p.add_argument("--default-chat-template-kwargs", type=_template_keywords, default=None, metavar="JSON",
                   help="keywords for the chat template of every chat line, under a line's own chat_template_kwargs "
                   "(vLLM's option), e.g. '{\"enable_thinking\": false}' for Qwen3")
    p.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                   help="leave a chat line's tools out of its chat template where its tool_choice is \"none\" "
                   "(vLLM's option; default: the tools reach the template whatever the tool_choice)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an unexpected failure")
    add_config_file_argument(p)


def utf8_text(text: str) -> str:
    """A command-line text that reaches the output or is matched against it (a name, a role, a stop string): refused
    where it is not UTF-8 (Python gives such bytes as lone surrogates, which JSON readers refuse or mangle)."""
    if not encodable_as_utf8(text):
        raise argparse.ArgumentTypeError(f"not UTF-8 text: {os.fsencode(text)!r} (the output is UTF-8 JSON)")
    return text


def _template_keywords(text: str) -> dict:
    """--default-chat-template-kwargs: a JSON object without the keys vLLM refuses in template keywords."""
    from batchllm.io.openai_batch import refused_template_keywords

    value = _json_object(text)
    if problem := refused_template_keywords(value):
        raise argparse.ArgumentTypeError(problem)
    return value


def _json_object(text: str) -> dict:
    """A JSON object given on the command line (argparse names the option of one that is not)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r} (e.g. '{{\"enable_thinking\": false}}')")
    return value


def _input_path(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fold `-i` into `args.input`; one input, given once, is required. `--served-model-name` takes one or
    more words, so argparse gives it an input path that follows it (`--served-model-name smol in.jsonl`):
    where no input was given otherwise and its last word names a file (one that exists, or *.jsonl), that
    word is the input."""
    if "input_option" not in args:
        return
    served = getattr(args, "served_model_name", None)
    if args.input is None and args.input_option is None and served is not None and len(served) > 1:
        if Path(served[-1]).is_file() or served[-1].endswith(".jsonl"):
            args.input = Path(served.pop())
    if args.input is not None and args.input_option is not None:
        parser.error("give the input file once: as INPUT or as -i, not both")
    args.input = args.input if args.input is not None else args.input_option
    if args.input is None:
        parser.error(f"{args.command}: the input file is required (INPUT or -i INPUT)")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _command_actions(parser: argparse.ArgumentParser, words: list[str]) -> dict[str, argparse.Action]:
    """Each flag of the subcommand `words` name first, to its action (none if they name none)."""
    command = _subcommands(parser).get(next((w for w in words if not w.startswith("-")), ""))
    return {} if command is None else {flag: action for action in command._actions for flag in action.option_strings}


def _command_flags(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """The long flags of the subcommand `words` name first (none if they name none)."""
    return [flag for flag in _command_actions(parser, words) if flag.startswith("--")]


_RUN_TOOL_FLAG = ("only `run` (run-batch) and `plan` take it: with --enable-auto-tool-choice and --tool-call-parser "
                  'they serve "auto" lines')
VLLM_SERVER_FLAGS = {
    "--enable-auto-tool-choice": _RUN_TOOL_FLAG, "--tool-call-parser": _RUN_TOOL_FLAG,
    "--tool-parser-plugin": _RUN_TOOL_FLAG,
    "--trust-request-chat-template": "a line's own chat_template is not taken: give --chat-template",
    "--tool-server": "no tool server: a tool call is returned in its line's answer, not run",
    "--log-config-file": "logging is set by BATCHLLM_LOG_LEVEL (or vLLM's VLLM_LOGGING_LEVEL)",
}
"""vLLM run-batch's frontend flags (not engine options) with no counterpart here, and what to do instead."""


def vllm_flag_not_taken(flag: str) -> str | None:
    """What to do instead of a vLLM run-batch flag with no counterpart here (`VLLM_SERVER_FLAGS`;
    `options.VLLM_NOT_TAKEN`, its engine options' keywords written as flags), or None. Made on the error path
    only, not at every start."""
    long_names = {short: name for name, short in VLLM_SHORT_FLAGS.items()}
    flag = flag.split(".", 1)[0]  # (vLLM's --structured-outputs-config.backend: a field of that option)
    if flag in VLLM_SERVER_FLAGS:
        return VLLM_SERVER_FLAGS[flag]
    if re.fullmatch(r"-O=?\w+", flag):  # vLLM's -O3, -O=3: its optimization level
        flag = "-O"
    name = long_names.get(flag) or flag.removeprefix("--").replace("-", "_")
    return not_taken_hint(name) if name in VLLM_NOT_TAKEN else None


_INPUT_LEN = "a prompt's length is --prompt-len here (with --workload nosharing), or --shared + --distinct"
_OUTPUT_LEN = "the output's length is --output here (--min-output/--max-output: a range, decodeheavy)"
VLLM_BENCH_FLAGS = {
    "--num-prompts": "vLLM bench's count of prompts is --requests here",
    "--dataset-name": "the prompts' shape is --workload here (shared, nosharing, decodeheavy, snippet), or a file of "
                      "token ids (--prompts-file)",
    "--dataset-path": "a file of prompts is --prompts-file here (prompt_token_ids lines)",
    "--input-len": _INPUT_LEN, "--random-input-len": _INPUT_LEN,
    "--prefix-len": "the shared prefix's length is --shared here (and its sharing degree --degree)",
    "--output-len": _OUTPUT_LEN, "--random-output-len": _OUTPUT_LEN,
    "--output-json": "the results' JSON file is --json-out here",
    "-o": "bench writes its results as JSON with --json-out FILE (-o is run's output file)",
    "--output-file": "bench writes its results as JSON with --json-out FILE (--output-file is run's output file)",
}
"""vLLM's `vllm bench throughput` flags and their counterparts in `batchllm bench`."""


def unrecognized_arguments_message(command: argparse.ArgumentParser, unknown: list[str]) -> str:
    """argparse's "unrecognized arguments" with, per unknown flag, what it means here (`vllm_flag_not_taken`)
    or the command's flags closest to it."""
    flags = [flag for action in command._actions for flag in action.option_strings if flag.startswith("--")]
    hints = []
    for word in unknown:
        name = word.split("=", 1)[0]
        if not name.startswith("-"):
            continue
        if "--requests" in flags and name in VLLM_BENCH_FLAGS:
            hints.append(f"{name}: {VLLM_BENCH_FLAGS[name]}")
        elif instead := vllm_flag_not_taken(name):
            hints.append(f"{name}: {instead}")
        elif close := difflib.get_close_matches(name, flags, n=2, cutoff=0.75):
            hints.append(f"{name}: did you mean {' or '.join(close)}?")
    return f"unrecognized arguments: {' '.join(unknown)}" + "".join(f"\n  {hint}" for hint in hints)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("batchllm")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    words = dashed_flag_names(sys.argv[1:] if argv is None else list(argv))
    try:  # (vLLM's --config FILE.yaml; argparse alone would read --config as --config-format's prefix)
        if not {"-h", "--help", "--version"} & set(words[:words.index("--") if "--" in words else None]):
            words = with_config_file(words, lambda rest: _command_actions(parser, rest),
                                     vllm_flag=lambda flag: vllm_flag_not_taken(flag) is not None)
    except ConfigFileError as error:
        parser.error(str(error))
    args, unknown = parser.parse_known_args(bare_flags_as_on(words, _command_flags(parser, words)))
    if unknown:  # refused by the subcommand's parser, with its usage and what each unknown flag may have meant
        command = _subcommands(parser)[args.command]
        command.error(unrecognized_arguments_message(command, unknown))
    _input_path(parser, args)
    if args.command == "run":
        _ray_options(_subcommands(parser)["run"], args)
    if args.command in ("run", "plan"):
        _tool_call_options(_subcommands(parser)[args.command], args)
    if problem := log_level_problem():
        return _fail(problem)
    logging.basicConfig(level=default_log_level(), format="batchllm %(levelname)s %(name)s: %(message)s")
    if unread := unread_vllm_variables():
        print(f"batchllm: note: vLLM's {', '.join(unread)} {'is' if len(unread) == 1 else 'are'} not read here "
              "(no effect)", file=sys.stderr)
    try:
        if args.command == "run":
            return run_command(args)
        if args.command == "plan":
            return plan_command(args)
        if args.command == "bench":
            return bench_command(args)
    except KeyboardInterrupt:  # before a job started (a started job reports its own interruption)
        print("batchllm: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:  # `plan ... | head`: the reader has what it wanted; quiet, as a tool killed by SIGPIPE
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE
    except Exception as e:  # a bug or an environment failure: not a failed line, not a bad option
        debug = getattr(args, "debug", False) or logging.getLogger().isEnabledFor(logging.DEBUG)
        if debug:
            traceback.print_exc()
        shows = "--debug" if "debug" in args else "BATCHLLM_LOG_LEVEL=DEBUG"  # (bench has no --debug)
        print(f"batchllm: error: unexpected failure: {type(e).__name__}: {e}"
              + ("" if debug else f" ({shows} shows the traceback)"), file=sys.stderr)
        return EXIT_UNEXPECTED
    return EXIT_CANNOT_START


def cannot_allocate(error: BaseException) -> bool:
    """The device or the host refused memory (torch's OutOfMemoryError, its CPU allocator's RuntimeError, a
    MemoryError): the job could not start there, as opposed to a failure of the code."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def _fail(message: str) -> int:
    print(f"batchllm: error: {message}", file=sys.stderr)
    return EXIT_CANNOT_START


def _stdout_to_devnull() -> None:
    """Point standard output at /dev/null, so that the interpreter's flush at exit does not fail again on the closed
    pipe (Python's advice for a BrokenPipeError)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # (no file descriptor: a replaced sys.stdout)
        pass


def run_command(args: argparse.Namespace) -> int:
    if args.ray:
        from batchllm.ray.jsonl_job import run_command_on_ray  # the only import of batchllm.ray

        return run_command_on_ray(args)
    if problem := input_problem(args.input):
        return _fail(problem)
    if directory_form(given := getattr(args, "output_as_given", None)):  # (argparse's Path dropped the slash)
        return _fail(f"cannot write the output {given!r}: it names a directory; -o names a file (e.g. "
                     f"{str(Path(given) / 'out.jsonl')!r}; a directory of shards is -o with --ray)")
    if args.stats is not None and (problem := _stats_problem(args.stats, _job_files(args))):
        return _fail(problem)  # before the job: a finished job must not end on an unwritable --stats
    try:
        refuse_output_onto_input(args.output, args.input)  # before the lock opens the output (a read-only input)
        refuse_unusable_file_names(args.output, args.errors_file or default_errors_path(args.output))
        with OutputLock(args.output) as lock:
            return _run_locked(args, lock)
    except JobError as e:
        return _fail(str(e))


def _job_files(args: argparse.Namespace) -> dict[str, Path]:
    """The files a job reads or writes, by what they are: the input, the output, its errors and state files."""
    return {"the input file": args.input, "the output": args.output,
            "the errors file": args.errors_file or default_errors_path(args.output),
            "the output's state file": state_path_for(args.output)}


_OPENAI_KEYS = (b'"custom_id"', b'"body"', b"\\u")
"""Bytes without which a line is no OpenAI Batch line (`io.jsonl._is_openai_line`: a custom_id, or a body), an
escaped key aside (\\u: such a line may be one)."""


def may_hold_openai_lines(path: Path) -> bool:
    """Whether the input may hold an OpenAI Batch line, whose error (and only such an error) the job writes into
    its errors file: False only where no line can be one (a plain file: its failed lines are records of the output,
    so its errors file is never written, nor need be writable)."""
    with open(path, "rb") as f:
        return any(key in raw for raw in f for key in _OPENAI_KEYS)


def _stats_problem(path: Path, job_files: dict[str, Path]) -> str | None:
    """Why the --stats file could not be written at the end of the job, or None (`later_write_problem`). It
    must not be one of the job's own files (`job_files`): it would replace that file's contents."""
    for what, other in job_files.items():
        if same_file(path, other):
            return f"--stats {str(path)!r} is {what}: writing the statistics would destroy it; choose another path"
    return later_write_problem(path, "--stats")


SAMPLING_FALLBACKS = {"max_tokens": 256, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
"""The sampling defaults of `run` where neither the command line nor the model's generation_config.json sets one."""


def sampling_defaults(args: argparse.Namespace, from_model: dict | None = None) -> dict:
    """The run's sampling defaults as SamplingParams fields (a line's own fields override them): the
    command line's, then the model's generation_config.json (`from_model`), then SAMPLING_FALLBACKS; and
    `io.ingest.OPENAI_MAX_TOKENS` where the command line gives no max_tokens (OpenAI lines' own rule), and
    `io.ingest.OPENAI_MAX_TOKENS_CAP` where --generation-config names a folder whose file sets max_new_tokens."""
    given = {name: getattr(args, name) for name in (*SAMPLING_FALLBACKS, "repetition_penalty")
             if getattr(args, name, None) is not None}  # (repetition_penalty: SamplingParams' 1.0 without one)
    defaults = {**SAMPLING_FALLBACKS, **(from_model or {}), **given, "stop": getattr(args, "stop", None),
                "ignore_eos": getattr(args, "ignore_eos", False)}  # (plan has --max-tokens alone)
    if "max_tokens" not in given:  # OpenAI lines without max_tokens: as OpenAI's API and vLLM's server
        defaults[OPENAI_MAX_TOKENS] = MODEL_FOR_CHAT if "max_tokens" in (from_model or {}) else ENDPOINT_DEFAULTS
    if getattr(args, "generation_config", "auto") not in ("auto", "vllm") and "max_tokens" in (from_model or {}):
        defaults[OPENAI_MAX_TOKENS_CAP] = from_model["max_tokens"]  # (a folder's max_new_tokens: vLLM's limit)
    return defaults


def keep_the_outputs_openai_rule(defaults: dict, state_path: Path, overwrite: bool) -> dict:
    """`defaults`, with the rule for OpenAI lines without max_tokens that the output of `state_path` was begun
    under where an earlier version's differs: TO_THE_CONTEXT (before completions lines took 16 tokens), or none
    recorded beside the model's max_tokens (before MODEL_FOR_CHAT: completions lines took the model's). A resumed
    job answers its remaining lines as it answered the others (and says so)."""
    rule = defaults.get(OPENAI_MAX_TOKENS)
    if overwrite or rule not in (ENDPOINT_DEFAULTS, MODEL_FOR_CHAT):
        return defaults
    recorded = recorded_option(state_path, OPENAI_MAX_TOKENS)
    if rule == ENDPOINT_DEFAULTS and recorded == TO_THE_CONTEXT:
        print("batchllm: note: this output was begun by an earlier version, under which /v1/completions lines "
              "without max_tokens run to the context: its remaining lines do too (--overwrite starts over with 16 "
              "tokens, OpenAI's default)", file=sys.stderr)
        return {**defaults, OPENAI_MAX_TOKENS: TO_THE_CONTEXT}
    if rule == MODEL_FOR_CHAT and recorded is None and recorded_option(state_path, "max_tokens") is not None:
        print("batchllm: note: this output was begun by an earlier version, under which /v1/completions lines "
              "without max_tokens take the model's max_tokens: its remaining lines do too (--overwrite starts over "
              "with 16 tokens, vLLM's default)", file=sys.stderr)
        return {k: v for k, v in defaults.items() if k != OPENAI_MAX_TOKENS}
    return defaults


def resolve_sampling_defaults(args: argparse.Namespace, model_dir: Path | None) -> tuple[dict, dict]:
    """(the run's sampling defaults, those of them the model's generation_config.json gave), checked: a
    bad value raises ValueError naming it (`model_dir` None: no model defaults)."""
    from_model = model_sampling_defaults(model_dir, args.generation_config)
    defaults = sampling_defaults(args, from_model)
    SamplingParams(**sampling_fields_of(defaults), seed=getattr(args, "seed", None))  # --seed also seeds the engine
    return defaults, from_model


def note_model_defaults(args: argparse.Namespace, from_model: dict) -> None:
    """Say which of the model's sampling defaults apply (those the command line does not set), as vLLM warns."""
    used = {k: v for k, v in from_model.items() if getattr(args, k, None) is None}
    if used:
        source = ("the model's generation_config.json" if args.generation_config == "auto"
                  else f"{args.generation_config}/generation_config.json")
        print(f"batchllm: sampling defaults from {source}: "
              + ", ".join(f"{k} {v}" for k, v in used.items())
              + " (a line's own fields and the command line's options override them)", file=sys.stderr)


RESULT_OPTIONS = ("model", "tokenizer", "chat_template", "default_chat_template_kwargs", "dtype", "load_format",
                  "max_model_len", "max_logprobs", "quantization", "kv_cache_dtype", "fp8_attention",
                  "skip_tokenizer_init", "served_model_name", "response_role",
                  "reasoning_parser", "exclude_tools_when_tool_choice_none", "auto_tool_choice",
                  "return_tokens_as_token_ids")
"""Options that decide what a line's answer is or whether it is accepted (with the sampling defaults and
--seed), and how OpenAI responses name the model and the answer's role and split its reasoning and tool calls
(auto_tool_choice: the parser "auto" lines are read by, `auto_tool_parser`; None, as recorded before it existed,
where they fail): an output is
resumed only under the same ones (`io.job.prepare_output`). Options of speed alone (step budget, kernels, block
size, parallelism, devices) may change between runs, and so may those that change only rounding
(fp8_deferred_scales, fp8_fused_quant). dtype is recorded as given: "auto" resolves by device, so give --dtype
to pin the precision of a job resumed on another kind of machine."""


def check_parsers_tokenizer(args: argparse.Namespace) -> None:
    """--reasoning-parser's and the "auto" tool-call parser's needs of the tokenizer (`io.reasoning.check_tokenizer`,
    `io.tool_parsers.check_tokenizer`: ValueError), checked before anything is written; the tokenizer is loaded for
    it only where a parser is given."""
    tool_parser = auto_tool_parser(args)
    if not (args.reasoning_parser or tool_parser) or args.skip_tokenizer_init:
        return
    from batchllm.inputs import prompt_processor_for

    vocab = prompt_processor_for(args.model, args.tokenizer, args.max_model_len).tokenizer.get_vocab()
    check_tokenizer(args.reasoning_parser, vocab)
    check_tool_parser_tokenizer(tool_parser, vocab)


def checked_model(args: argparse.Namespace) -> ModelSource | None:
    """--model as read (None: the default model, left for later: its first use converts it), checked before
    anything is written or any engine starts: a bad model path or id, a config.json it cannot read, a context it
    cannot hold, missing weights or tokenizer files, a -q the checkpoint contradicts (ModelLoadError, ValueError).
    `run` and `run --ray` (where the driver sees the model) both check here."""
    if args.model is None:
        return None
    source = read_model_source(args.model, args.max_model_len)
    check_model_files(source, args.load_format, args.tokenizer, args.skip_tokenizer_init)
    resolve_quantization(args.quantization, source.spec.quantization)
    return source


def read_chat_template_once(args: argparse.Namespace) -> None:
    """--chat-template read here, once: its text replaces the path in `args`, so that the engine, its
    workers and Ray's tasks get the template itself (not a file only this machine may hold), and a bad one
    fails before anything is written (ValueError)."""
    if getattr(args, "chat_template", None) is not None:
        args.chat_template = read_chat_template(args.chat_template)


def _resolve_directories(options: dict) -> None:
    """`options`' model and tokenizer, where they name an existing path, as its absolute path (in place), so that
    another spelling of the same directory is the same option."""
    for name in ("model", "tokenizer"):
        if options[name] is not None and Path(options[name]).exists():
            options[name] = str(Path(options[name]).resolve())


def _default_model_path_if_named() -> str | None:
    """The converted default model's path, None where no cache directory can be named (then no model given is
    that one, and a job given its own model needs none)."""
    try:
        return str(default_model_path().resolve())
    except ValueError:
        return None


def results_options(args: argparse.Namespace, defaults: dict) -> dict:
    """The options recorded beside the output, as JSON values (`defaults`: the run's sampling defaults): a
    model or tokenizer directory by its absolute path, so that another spelling of it resumes; the chat
    template (text, `read_chat_template_once`) by a digest of it, so that an edited file does not; with
    --generation-config DIR, that file's EOS ids (its sampling defaults are among `defaults`)."""
    options = {name: getattr(args, name, None) for name in RESULT_OPTIONS}
    options["auto_tool_choice"] = auto_tool_parser(args)  # (the parser "auto" lines are read by; None: refused)
    options["dtype"] = DTYPE_ALIASES.get(options["dtype"], options["dtype"])  # half and float16 are one dtype
    if options["response_role"] == "assistant":  # the default recorded as unset: outputs written before the
        options["response_role"] = None  # option existed (recorded without it) resume under the default
    options["default_chat_template_kwargs"] = options["default_chat_template_kwargs"] or None  # ({}: none, as unset)
    for flag in ("exclude_tools_when_tool_choice_none", "return_tokens_as_token_ids"):  # (off: unset, so that outputs
        options[flag] = options[flag] or None  # recorded before the option existed resume without it)
    _resolve_directories(options)
    if options["model"] is not None and options["model"] == _default_model_path_if_named():
        options["model"] = None  # the default model by its path: the same model as none given
    if options["chat_template"] is not None:
        options["chat_template"] = "sha256:" + hashlib.sha256(options["chat_template"].encode()).hexdigest()[:16]
    if args.generation_config not in ("auto", "vllm"):  # another folder's file: its EOS ids end answers too
        options["generation_eos_token_ids"] = sorted(set(generation_eos_token_ids(None, args.generation_config)))
    stop = defaults.get("stop")
    return {**options, **defaults, "stop": list(stop) if stop else None, "seed": args.seed}


def _run_locked(args: argparse.Namespace, lock: OutputLock) -> int:
    """The job, its output locked (`lock`): everything checked before the model loads; a job found complete is
    reported without writing anything (its output may be read-only: `lock.write_problem`, refused where lines are
    left). A fresh or --overwrite output is emptied and tied to the job only once the model has loaded
    (`ResumeState.begin` in `_run_job`): a model that fails to load leaves the job's files as they were."""
    errors_path = args.errors_file or default_errors_path(args.output)
    try:
        source = checked_model(args)
        read_chat_template_once(args)
        check_parsers_tokenizer(args)
        defaults, from_model = resolve_sampling_defaults(args, source.model_dir if source is not None else None)
        defaults = keep_the_outputs_openai_rule(defaults, state_path_for(args.output), args.overwrite)
        num_lines = count_input_lines(args.input)
        resume = prepare_output(args.output, args.input, args.overwrite, errors_path,
                                results_options(args, defaults), num_lines, lock.write_problem,
                                functools.partial(may_hold_openai_lines, args.input), defer_start=True)
        job = _Job(args.output, errors_path, resume, num_lines)
        if job.num_lines and job.num_recorded_before >= job.num_lines:  # nothing left: do not even load the model
            status = job.report_complete()
            return _write_stats(args, job.nothing_run_stats()) or status
    except (ValueError, OSError, JobError) as e:
        return _fail(str(e))
    if job.num_lines == 0:  # as vLLM's run-batch: an empty output, exit 0 (and no model loaded)
        resume.begin()
        print(f"batchllm: {args.input} has no requests (it is empty or holds only blank lines); "
              f"wrote an empty {args.output}", file=sys.stderr)
        return _write_stats(args, job.nothing_run_stats()) or EXIT_OK
    note_model_defaults(args, from_model)
    if resume.num_records:
        print(f"batchllm: resuming {args.output}: {len(resume.done_ids)} lines done, "
              f"{len(resume.done_error_lines)} failed before"
              + (f"; cut a torn last line of {' and '.join(map(str, resume.repaired_files))} "
                 f"({resume.repaired_bytes} bytes)" if resume.repaired_bytes else ""),
              file=sys.stderr)
    with _signals_interrupt(functools.partial(job.rerun_hint, args.overwrite)) as results_written:
        try:
            return _run_job(args, job, defaults, source, results_written)
        except Interrupted as e:
            name = signal.Signals(e.signum).name
            print(f"batchllm: interrupted ({name}): {job.stopped_report(args.overwrite)}", file=sys.stderr)
            stats = {"interrupted": name, **job.stopped_stats(args.overwrite)}
            _write_stats(args, stats, "the results written so far are kept")  # (the status stays the signal's)
            return 128 + e.signum
        except OutputWriteError as e:  # (what was written stays: say how to resume it where that is not plain)
            code = _fail(f"{e}; {job.rerun_hint(True)}" if args.overwrite else str(e))
            _write_failed_stats(args, job, e)
            return code
        except InputChanged as e:  # (found before the output was started: what it held is as it was)
            code = _fail(str(e))
            _write_failed_stats(args, job, e)
            return code


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived during `run`: the job stops, keeping (and syncing) what is finished.
    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


RESUME_HINT = "run the same command to resume"
RESUME_WITHOUT_OVERWRITE_HINT = ("run the same command without --overwrite to resume (with --overwrite, the lines "
                                 "written so far would be computed again)")
"""What to run after a stopped --overwrite job that had started its output over (`run`, and `run --ray`)."""


@contextlib.contextmanager
def _signals_interrupt(rerun_hint: Callable[[], str] = lambda: RESUME_HINT):
    """SIGINT and SIGTERM raise `Interrupted` in the main thread: the job stops cleanly, keeping (and syncing)
    what is finished. A second signal while it stops ends the process at once (`_exit_now`, status 128 + that
    signal), as a second Ctrl-C ends vLLM: what is on disk stays resumable (records are whole lines appended after
    the state file was written; a torn last line is cut by the next run). Yields what the job calls once every
    result is written: the first signal after that is ignored (the report and the engine's shutdown are left to
    finish; the job was not interrupted), a second one still ends the process, saying `rerun_hint()` (what to run
    to go on). Previous handlers come back afterwards."""
    stopping = False
    signals = 0

    def stop_raising() -> None:
        nonlocal stopping
        stopping = True

    if threading.current_thread() is not threading.main_thread():
        yield stop_raising
        return

    def handler(signum, frame):
        nonlocal signals
        signals += 1
        if signals > 1:
            _exit_now(signum, rerun_hint())
        if stopping:
            return
        stop_raising()
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop_raising
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _exit_now(signum: int, rerun_hint: str = RESUME_HINT) -> None:
    """End the process at once on a second signal (`_signals_interrupt`), status 128 + `signum`: the records the
    output writers hold are handed to the OS first (`io.job.flush_open_writers`, bounded), then one line is said
    through the raw stderr descriptor (the interrupted code may be inside sys.stderr), and no cleanup runs
    (data-parallel workers and tensor-parallel ranks die with their parent; Ray ends a dead driver's workers). The
    line ends with `rerun_hint`: what to run to go on."""
    from batchllm.io.job import flush_open_writers

    flush_open_writers()
    name = signal.Signals(signum).name
    with contextlib.suppress(OSError):
        os.write(2, f"\nbatchllm: {name} again: exiting now; the results written so far are kept, {rerun_hint}\n"
                 .encode())
    os._exit(128 + signum)


def lines_progress(num_lines: int, num_recorded: int, num_failed: int) -> str:
    """Where a stopped job stands: lines with results, lines failed (recorded with an error), lines left, of
    `num_lines` (they add up to it: each line gets one record, a result or an error; `num_recorded` counts both)."""
    return (f"{num_recorded - num_failed} of {num_lines} lines have results, {num_failed} failed (recorded with an "
            f"error), {num_lines - num_recorded} left")


def lines_progress_stats(num_lines: int, num_recorded: int, num_failed: int) -> dict:
    """`lines_progress` as --stats keys: num_lines_done (lines with results, as in a finished run's statistics),
    num_lines_failed and num_lines_left, beside num_lines and num_lines_recorded (results and errors)."""
    return {"num_lines": num_lines, "num_lines_recorded": num_recorded, "num_lines_done": num_recorded - num_failed,
            "num_lines_failed": num_failed, "num_lines_left": num_lines - num_recorded}


@dataclass
class _Job:
    """What `run` knows about the job's files: the resume state and the lines it still owes."""

    output: Path
    errors_path: Path
    resume: ResumeState
    num_lines: int
    """Non-blank input lines: each gets exactly one record (in the output or the errors file)."""
    writers: tuple = ()

    @property
    def num_recorded_before(self) -> int:
        return self.resume.num_lines_recorded

    @property
    def num_recorded(self) -> int:
        """Lines with a record (a result or an error), this run's and earlier runs'."""
        return self.num_recorded_before + sum(w.num_written for w in self.writers)

    @property
    def num_failed(self) -> int:
        """Lines recorded with an error, this run's and earlier runs'."""
        return len(self.resume.done_error_lines) + sum(w.num_errors for w in self.writers)

    @property
    def num_answered_now(self) -> int:
        """Lines this run recorded with a result (its records that are no error)."""
        return sum(w.num_written - w.num_errors for w in self.writers)

    def progress(self) -> str:
        """Where a stopped job stands, for its message (`lines_progress`)."""
        return lines_progress(self.num_lines, self.num_recorded, self.num_failed)

    def _earlier_kept(self, overwrite: bool) -> bool:
        """Whether --overwrite found earlier records that it has not yet replaced (the model had not loaded)."""
        return overwrite and self.resume.start_output is not None and self.resume.earlier is not None

    def rerun_hint(self, overwrite: bool) -> str:
        """What to run to go on after the job stopped. Under --overwrite, the same command would start over: once the
        output was started over (`ResumeState.begin`), it resumes without --overwrite; before (the model had not
        loaded), the earlier records were left as they were, and the same command starts them over."""
        if self._earlier_kept(overwrite):
            return (f"{self.output} was not started over (the model had not loaded) and holds what it held before; "
                    "run the same command to start over")
        if overwrite and self.resume.start_output is None:
            return RESUME_WITHOUT_OVERWRITE_HINT
        return RESUME_HINT

    def _earlier_counts(self, overwrite: bool) -> ResumeState | None:
        """The records --overwrite has not yet replaced (`_earlier_kept`) where they answer this input, else None;
        read once (`ResumeState.earlier` reads the whole output and errors file; the report and --stats both ask)."""
        return self._earlier_records if self._earlier_kept(overwrite) else None

    @functools.cached_property
    def _earlier_records(self) -> ResumeState | None:
        """`ResumeState.earlier`'s read, made once."""
        return self.resume.earlier()

    def stopped_report(self, overwrite: bool) -> str:
        """Where a stopped job stands and what to run (`rerun_hint`). An --overwrite output not yet started over is
        described by what it holds: its earlier records (counted where they answer this input), not this job's
        none."""
        if not self._earlier_kept(overwrite):
            return f"{self.progress()}; {self.rerun_hint(overwrite)}"
        found = self._earlier_counts(overwrite)
        held = ("its earlier records as they were (not of this input, or unreadable)" if found is None else
                "its earlier results: " + lines_progress(self.num_lines, found.num_lines_recorded,
                                                         len(found.done_error_lines)))
        return (f"{self.output} was not started over (the model had not loaded) and holds {held}; run the same "
                "command to start over, or it without --overwrite to resume those results under the options they "
                "were written with")

    def stopped_stats(self, overwrite: bool) -> dict:
        """`progress_stats` of a stopped job; of the earlier records where --overwrite has not replaced them
        (`stopped_report`), as the output holds them."""
        found = self._earlier_counts(overwrite)
        if found is None:
            return self.progress_stats()
        recorded = found.num_lines_recorded
        return {**lines_progress_stats(self.num_lines, recorded, len(found.done_error_lines)),
                "num_lines_resumed": recorded}

    def progress_stats(self) -> dict:
        """`progress` as --stats keys (`lines_progress_stats`), with num_lines_resumed: the lines recorded by
        earlier runs."""
        return {**lines_progress_stats(self.num_lines, self.num_recorded, self.num_failed),
                "num_lines_resumed": self.num_recorded_before}

    def nothing_run_stats(self) -> dict:
        """--stats of a run that found nothing to do (an empty input, or every line answered before): the keys of
        every other run's (`progress_stats`)."""
        return {**self.progress_stats(), "wall_s": 0.0}

    def report_complete(self) -> int:
        failed = len(self.resume.done_error_lines)
        print(f"batchllm: {self.output} is already complete ({self.num_lines} lines: {len(self.resume.done_ids)} "
              f"done, {failed} failed); nothing to run (--overwrite starts over)", file=sys.stderr)
        return EXIT_LINES_FAILED if failed else EXIT_OK


def _run_job(args: argparse.Namespace, job: _Job, defaults: dict, source: ModelSource | None,
             results_written: Callable[[], None]) -> int:
    """Build the engine while a background thread reads, templates and tokenizes the input (both
    take seconds on a large job and the second needs only the tokenizer), then run the valid lines.
    With several engine processes they are spawned first of all (`_engine_processes`). The run's
    `wall_s` starts once the engine is built: it holds whatever reading is left then. `source`: the
    model as read already (None: read here); every step below starts from the same one. `results_written`
    is called once every result is written, before the report and the engine's shutdown. A data-parallel
    worker that dies during the job fails it (exit status 2) after the others' results are written."""
    from batchllm.parallel.data_parallel import WorkerDied

    built = _build_while_reading(args, job, defaults, source)
    if isinstance(built, int):
        return built
    llm, reading = built
    try:
        started = time.perf_counter()
        phases = {"engine_build_s": started - reading.started}
        if llm.engine is not None:  # (several engine processes report theirs per rank)
            phases["build_phases"] = llm.engine.build_seconds
        waiting = time.perf_counter()
        valid, errors, file_format, ignored = reading.result()  # (an input changed meanwhile: `InputChanged`, raised
        phases.update(input_read_s=reading.seconds, input_read_wait_s=time.perf_counter() - waiting)  # before begin)
        job.resume.begin()  # the model loaded and the lines read: only now is a fresh (or --overwrite) output emptied
        claim = functools.partial(claim_errors_file, args.output)  # (locked for the job; a resume checks it)
        with ResultWriter(args.output) as out, ResultWriter(job.errors_path, lazy=True, on_open=claim) as errors_out:
            job.writers = (out, errors_out)
            note_ignored_fields(ignored)
            note_models_named_without_model(args, valid, llm.model_dir.name)
            valid, errors = _refuse_what_the_cache_cannot_hold(llm, valid, errors)
            for error in errors:
                (errors_out if error.is_openai(file_format) else out).write(error.record(file_format))
            out.sync()
            errors_out.sync()  # (every error record durable before any answer: `io.ingest.IdClaims` resumes on it)
            _generate_into((out, errors_out, file_format), llm, valid, args, job.num_failed)
        results_written()  # every result is written and its files closed: a later signal cuts no work short
        return _report(args, job, {**llm.last_stats, **phases}, time.perf_counter() - started)
    except WorkerDied as e:  # during the job: what the other workers finished is written, and a rerun resumes
        print(f"batchllm: error: {e} ({job.progress()}; {job.rerun_hint(args.overwrite)})", file=sys.stderr)
        _write_failed_stats(args, job, e)
        return EXIT_CANNOT_START
    finally:
        llm.shutdown()  # data-parallel workers and tensor-parallel followers stop with the job


def _build_while_reading(args: argparse.Namespace, job: _Job, defaults: dict, source: ModelSource | None):
    """(the LLM, the input being read in the background), or the exit status of an engine that could not be
    built (named); with several engine processes they are spawned first of all (`_engine_processes`), and stopped
    at once if the build fails."""
    workers = None
    try:
        config = engine_config(**{**engine_kwargs_from_args(args), "seed": args.seed or 0})  # --seed: lines', engine's
        # before this process's heavy imports, which overlap the workers'
        config, workers, source = _engine_processes(config, source)
        from batchllm.engine import resolve_model
        from batchllm.llm import LLM, front_end_for

        front = front_end_for(config, source)
        facts = resolve_model(config, source=source)  # what can be checked without weights: before reading
        reading = _InBackground(prepare_lines, args.input, front.prompts, defaults, args.seed, job.resume,
                                progress=not args.no_progress, serving=line_serving(args))
        return LLM.from_config(config, front, workers, facts), reading
    except BaseException as e:  # the workers stop now, not at exit
        if workers is not None:
            workers.shutdown()
        if (problem := engine_start_problem(e)) is None:  # an interrupt, or a failure of ours (status 3, --debug)
            raise
        return _fail(problem)


def engine_start_problem(error: BaseException) -> str | None:
    """The one line `run` says (status 2) for an engine that could not be built because of `error`: the message of
    a ValueError or OSError (a ModelLoadError: damaged or missing weights...) or of a data-parallel worker that could
    not build its own (WorkerDied); "the engine could not start: <type>: <message>" where memory was refused
    (`cannot_allocate`). None for anything else (a failure of the code, an interrupt): not a reason to give, raised.
    `run --ray`'s replicas say the same (`ray.stages.EngineStartError`)."""
    from batchllm.parallel.data_parallel import WorkerDied

    if isinstance(error, (ValueError, OSError, WorkerDied)):  # WorkerDied: a worker could not build its engine
        return str(error)
    if cannot_allocate(error):
        return f"the engine could not start: {type(error).__name__}: {error}"
    return None


def note_ignored_fields(ignored: dict[str, int], where: str = "") -> None:
    """Say which fields of the lines were ignored (a table's other columns, an OpenAI line's own keys), as vLLM warns
    (`where`: which lines were looked at, where not all)."""
    if ignored:
        shown = ", ".join(f"{name} ({count} line{'s' * (count != 1)})" for name, count in sorted(ignored.items())[:20])
        more = f" and {len(ignored) - 20} more" if len(ignored) > 20 else ""
        print(f"batchllm: ignored fields that are not request fields{where}: {shown}{more}", file=sys.stderr)


def note_models_named_without_model(args: argparse.Namespace, valid: list, model_name: str) -> None:
    """Say, before generating, which models the lines name that this run's model answers under their names (vLLM
    refuses such a line; it runs here): without --model, the default model answers them; with it, their responses
    echo names of models that did not answer them (--served-model-name, which renames them, says nothing). A line
    naming the model as --model gives it, or by its directory's name, is its own."""
    if args.served_model_name and args.model is not None:
        return
    own = {model_name, *(args.served_model_name or ())} | ({str(args.model)} if args.model is not None else set())
    named: dict[str, int] = {}
    for item in valid:
        model = item.line.model
        if model is not None and model not in own:
            named[model] = named.get(model, 0) + 1
    if not named:
        return
    shown = ", ".join(f"{name!r} ({count} line{'s' * (count != 1)})" for name, count in sorted(named.items())[:5])
    shown += " and more" if len(named) > 5 else ""
    if args.model is None:
        print(f"batchllm: note: no --model given: the default model ({model_name}) answers the lines naming "
              f"{shown}; give --model to run another", file=sys.stderr)
    else:
        print(f"batchllm: note: {model_name} answers the lines naming {shown}, and their responses' \"model\" "
              "echoes those names; --served-model-name NAME puts NAME there instead", file=sys.stderr)


def _refuse_what_the_cache_cannot_hold(llm, valid: list, errors: list) -> tuple[list, list]:
    """(valid, errors) with each line whose request could not fit the built engine's KV cache even alone
    moved to the errors, its line named (`LLM.kv_cache_problem`); such a request would stop the job."""
    from batchllm.io.jsonl import LineError

    refused = [(item, problem) for item in valid
               if (problem := llm.kv_cache_problem(len(item.prompt.token_ids), item.params))]
    if not refused:
        return valid, errors
    lines = {id(item) for item, _ in refused}
    errors = sorted([*errors, *(LineError.for_line(item.line, problem) for item, problem in refused)],
                    key=lambda error: error.line_number)
    return [item for item in valid if id(item) not in lines], errors


def _engine_processes(config, source: ModelSource | None = None):
    """(config, workers, source): the config with engines_per_gpu chosen where it is not set
    (`data_parallel.auto_engines_per_gpu`: 2 for a small model on a GPU, said on stderr); with
    more than one engine process (data_parallel_size x engines_per_gpu > 1) the `DataParallelEngine`
    spawned now (not yet ready; else None); the config's model as read (`source`, if given, else
    here). Reads only the model's config (no torch, no tokenizer), so the workers' imports and
    builds overlap this process's own start-up."""
    from batchllm.parallel.data_parallel import (
        DataParallelEngine,
        auto_engines_per_gpu,
        cuda_device_count,
        usable_cores,
    )

    mc, par = config.model, config.parallel
    source = read_model_source(mc.model, mc.max_model_len) if source is None else source
    spec = source.spec
    if par.engines_per_gpu is None:
        engines = auto_engines_per_gpu(config, spec.num_parameters, cuda_device_count, usable_cores())
        if engines > 1:
            print(f"batchllm: {engines} engine processes per GPU: a model of {spec.num_parameters / 1e6:.0f}M "
                  "parameters leaves one engine's GPU idle while its host schedules (--engines-per-gpu 1: one)",
                  file=sys.stderr)
        config = dataclasses.replace(config, parallel=dataclasses.replace(par, engines_per_gpu=engines))
    if config.parallel.num_engines == 1:
        return config, None, source
    return config, DataParallelEngine(config, source.model_dir, source.max_model_len), source


class _InBackground:
    """`function(*args, **kwargs)` run in a daemon thread (an exiting process never waits for it);
    `result()` waits for it, then returns its value or raises its exception. `started`: its
    perf_counter at the start; `seconds`: how long it ran, once it has ended."""

    def __init__(self, function: Callable, *args, **kwargs) -> None:
        self._value = self._error = None
        self.started, self.seconds = time.perf_counter(), None
        self._thread = threading.Thread(target=self._run, args=(function, args, kwargs), daemon=True,
                                        name=f"batchllm-{function.__name__}")
        self._thread.start()

    def _run(self, function: Callable, args: tuple, kwargs: dict) -> None:
        try:
            self._value = function(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller of result(), whatever it is
            self._error = e
        finally:
            self.seconds = time.perf_counter() - self.started

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _generate_into(writers: tuple, llm, valid: list, args: argparse.Namespace, num_failed: int) -> None:
    """Run the valid lines and append each result as it completes (`writers`: the output's and the errors file's
    ResultWriter and the file's format; the output counts them: `_Job.num_answered_now`; `num_failed`: the lines
    failed so far, for the progress bar). A line whose request failed while it ran (`output_error`) gets the error
    record of a line refused before (an OpenAI line's in the errors file), and so does one whose answer the job's
    tool-call parser raises on (`io.tool_parsers.ToolParserError`, as vLLM's request fails). The engine loop is
    closed on the way out, whatever stops it (an interrupt, a write error)."""
    from batchllm.io.jsonl import LineError
    from batchllm.request_output import output_error

    out, errors_out, file_format = writers
    tokenizer = llm.get_tokenizer()
    names = response_shape(args, llm.model_dir.name).for_tokenizer(tokenizer)
    desc = f"tokens ({num_failed} lines failed)" if num_failed else "tokens"
    results = llm.iter_generate([p for _, p, _ in valid], [sp for _, _, sp in valid],
                                use_tqdm=not args.no_progress, progress_desc=desc)
    try:
        for index, output in results:
            line = valid[index].line
            record = None
            if (error := output_error(output)) is None:
                try:
                    record = record_for(line, output, names, tokenizer)
                except ToolParserError as e:  # (an answer vLLM's tool parser raises on: the request fails there)
                    error = str(e)
            if record is not None:
                out.write(record)
            else:
                failed = LineError.for_line(line, error)
                (errors_out if failed.is_openai(file_format) else out).write(failed.record(file_format))
    finally:
        try:
            results.close()  # aborts what still runs; its statistics land in llm.last_stats
        except Exception:  # noqa: BLE001 - the engine is dropped; the failure that stopped the loop matters
            logger.debug("closing the engine loop failed", exc_info=True)


def line_serving(args: argparse.Namespace) -> LineServing:
    """How `run`, `run --ray` and `plan` serve each line (`io.ingest.LineServing`): the one place its options are
    read."""
    return LineServing(args.default_chat_template_kwargs, args.exclude_tools_when_tool_choice_none,
                       auto_tool_parser(args), args.reasoning_parser, args.return_tokens_as_token_ids)


def response_shape(args: argparse.Namespace, model_name: str) -> ResponseShape:
    """What OpenAI response lines call the model and a chat answer's author (`model_name`: the model's), how the
    job served the lines (`line_serving`: its parsers split the answers), and their `system_fingerprint`."""
    given = os.fsencode(str(args.model)).decode("utf-8", "replace") if args.model is not None else None  # (a path)
    return ResponseShape(given or model_name, tuple(args.served_model_name or ()), args.response_role,
                         line_serving(args), fingerprint=system_fingerprint(args))


FINGERPRINT_MODES = ("full", "hash", "custom", "none")
FINGERPRINTED_OPTIONS = ("model", "tokenizer", "dtype", "quantization", "kv_cache_dtype", "max_model_len")
"""The options a `system_fingerprint`'s hash covers: what serves the answers (vLLM hashes its whole config)."""


def system_fingerprint(args: argparse.Namespace) -> str | None:
    """The OpenAI responses' `system_fingerprint` as vLLM 0.26's --fingerprint-mode makes it (default full; they
    were always null): full, "batchllm-<version>[-tpN][-dpN]-<hash8>", the parallelism where above 1; hash, without
    it; custom, --fingerprint-value (None without one, as vLLM's); none, None."""
    from batchllm import __version__

    mode = getattr(args, "fingerprint_mode", "none")
    if mode in ("none", "custom"):
        return getattr(args, "fingerprint_value", None) if mode == "custom" else None
    served = {name: getattr(args, name, None) for name in FINGERPRINTED_OPTIONS}
    _resolve_directories(served)
    digest = hashlib.sha256(json.dumps(served, sort_keys=True, default=str).encode()).hexdigest()[:8]
    parallel = "".join(f"-{short}{size}" for short, size in (
        ("tp", getattr(args, "tensor_parallel_size", 1) or 1), ("dp", getattr(args, "data_parallel_size", 1) or 1))
        if size > 1) if mode == "full" else ""
    return f"batchllm-{__version__}{parallel}-{digest}"


def _report(args: argparse.Namespace, job: _Job, stats: dict, wall: float) -> int:
    """The end-of-run summary line (and --stats); the exit status. Every line count is the job's own
    (`_Job.progress_stats`: the records its writers wrote and those the resume state found), as a stopped run's
    are: the line, --stats and the status cannot tell different stories."""
    progress = job.progress_stats()
    total_done, num_failed, num_done = progress["num_lines_done"], progress["num_lines_failed"], job.num_answered_now
    rate = lambda n: n / wall if wall > 0 else 0.0  # noqa: E731
    stats = {**stats, **progress, "wall_s": wall}  # (every run's line keys: a stopped run's too)
    if "output_tokens" in stats:  # (the engine's rate was over its own time, without the input's reading)
        stats["output_tokens_per_s"] = rate(stats["output_tokens"])
    print(
        f"batchllm: {total_done + num_failed} lines: {total_done} done, {num_failed} failed ({num_done} run now) "
        f"in {wall:.1f} s: {rate(num_done):.2f} req/s, {rate(stats.get('prompt_tokens', 0)):.0f} input tok/s, "
        f"{rate(stats.get('output_tokens', 0)):.0f} output tok/s, prefix sharing saved "
        f"{100 * stats.get('saving_ratio', 0.0):.1f}% of prefill{_recomputed(stats)} -> {args.output}",
        file=sys.stderr,
    )
    if job.errors_path.is_file() and job.errors_path.stat().st_size:
        print(f"batchllm: failed OpenAI Batch lines are in {job.errors_path}", file=sys.stderr)
    return _write_stats(args, stats) or (EXIT_LINES_FAILED if num_failed else EXIT_OK)


def _write_failed_stats(args: argparse.Namespace, job: _Job, error: Exception) -> None:
    """--stats of a run that failed part-way (a dead worker, a full disk): the error and the lines done and left."""
    _write_stats(args, {"failed": str(error), **job.progress_stats()}, "the results written so far are kept")


def _recomputed(stats: dict) -> str:
    """The report's note of the tokens preemption computed again (none: no note)."""
    tokens = stats.get("recomputed_tokens", 0)
    return f" ({tokens} tokens computed again after preemption)" if tokens else ""  # (or a prefix's release)


def _write_stats(args: argparse.Namespace, stats: dict, results: str = "the results are complete") -> int | None:
    """Write --stats (if asked for); the exit status of a failed write, else None (`results`: what the
    failure message says of the results)."""
    if args.stats is not None:
        try:
            args.stats.write_text(json.dumps(stats, indent=2) + "\n")
        except OSError as e:  # the results are written; only the statistics are lost
            return _fail(f"cannot write --stats {str(args.stats)!r}: {e.strerror or e} ({results})")
    return None


def _plan_input_problem(path: Path) -> str | None:
    """Why `plan` cannot read its input, or None: `input_problem`'s reasons, but standard input (where
    `input_problem` refuses it) in plan's own words: its reasons are a job's (a fingerprint, a resume), which plan has
    none of; plan reads its lines by path, with `run`'s reader."""
    if is_standard_input(path):
        return (f"cannot read the input from {stream_words(path)} ({str(path)}): plan reads its input file by path, "
                "as run does, not a stream; write it to a file first (e.g. cat x.jsonl > in.jsonl) and give that path")
    return input_problem(path)


def plan_command(args: argparse.Namespace) -> int:
    if problem := _plan_input_problem(args.input):
        return _fail(problem)
    from batchllm.inputs import prompt_processor_for
    from batchllm.prefix import plan_prefix_sharing

    if args.groups < 0:
        return _fail(f"--groups must be >= 0, got {args.groups}")
    try:
        engine_config(max_model_len=args.max_model_len, max_logprobs=args.max_logprobs)  # (their checks, as run's)
        prompts = prompt_processor_for(args.model, args.tokenizer, args.max_model_len, args.max_logprobs,
                                       args.chat_template, args.generation_config)
        vocab = prompts.tokenizer.get_vocab()  # (the parsers' needs of it, refused as run refuses them)
        check_tokenizer(args.reasoning_parser, vocab)
        check_tool_parser_tokenizer(auto_tool_parser(args), vocab)
        # run's sampling defaults: a line's max_tokens decides its -1 truncation and its min_tokens check
        model_dir = None if args.model is None else read_model_source(args.model, args.max_model_len).model_dir
        defaults, _ = resolve_sampling_defaults(args, model_dir)
    except (ValueError, OSError) as e:
        return _fail(str(e))
    valid, errors, _, ignored = prepare_lines(args.input, prompts, defaults, None, serving=line_serving(args))
    note_ignored_fields(ignored)
    for error in errors:
        print(f"batchllm: {error.message}", file=sys.stderr)
    token_ids = [p.token_ids for _, p, sp in valid for _ in range(sp.n)]  # (none: an empty plan, as run's)
    started = time.perf_counter()
    plan = plan_prefix_sharing(token_ids, mode=args.plan_mode)
    summary = {**plan.summary([len(p.token_ids) for _, p, _ in valid]),  # (each line's prompt once, whatever its n)
               "plan_seconds": round(time.perf_counter() - started, 3), "num_lines_failed": len(errors)}
    if args.groups > 0:
        summary["largest_groups"] = largest_groups(plan, token_ids, prompts.tokenizer, args.groups)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"requests             {summary['num_requests']}")
        print(f"groups               {summary['num_groups']} top-level, {summary['num_nested_groups']} nested, "
              f"{summary['num_ungrouped']} request{'' if summary['num_ungrouped'] == 1 else 's'} ungrouped "
              f"({args.plan_mode}-level plan)")
        print(f"sharing degree       mean {summary['mean_sharing_degree']:.2f}, max {summary['max_sharing_degree']}")
        completions = summary["num_completions"]
        print(f"prompt tokens        {summary['prompt_tokens']}" + ("" if completions == summary["num_requests"] else
                                                                    f" ({summary['completion_prompt_tokens']} over "
                                                                    f"{completions} completions)"))
        print(f"prefill tokens       {summary['prefill_tokens']} after sharing")
        print(f"saving ratio         {100 * summary['saving_ratio']:.1f}%  (1 - prefill / completions' prompt tokens)")
        if errors:
            print(f"lines failed         {len(errors)} (see above)")
        _print_groups(summary.get("largest_groups", []))
    return EXIT_LINES_FAILED if errors else EXIT_OK


def largest_groups(plan, token_ids: list, tokenizer, n: int, words: int = 12) -> list[dict]:
    """The n groups, at any depth, that save the most prefill, largest saving first: members (nested groups'
    included), the shared prefix's length in tokens (from the prompt's start), the prefill tokens it saves (its
    own part of the prefix, past its enclosing group's, computed once instead of once per member) and its first
    `words` words, detokenized. A nested group also gives its enclosing group's prefix length and the first words
    of its own part (`prefix_own`): its prefix starts as its parent's, so the start alone does not tell them apart.
    (A chat file's groups all nest in the chat template's opening, a top-level group of a few tokens: listing the
    top level showed only that.)"""
    saved = ((plan.own_prefix_len(g) * (len(plan.prompts_under(g.group_id)) - 1), g) for g in plan.groups)
    ranked = sorted(saved, key=lambda item: (-item[0], item[1].group_id))[:n]

    def first_words(ids) -> str:
        text = tokenizer.decode([int(t) for t in ids]) if tokenizer is not None else " ".join(map(str, ids))
        return " ".join(text.split()[:words])

    out = []
    for saving, g in ranked:
        members = plan.prompts_under(g.group_id)
        row = {"members": len(members), "prefix_tokens": g.prefix_len, "saves_tokens": saving,
               "nested_groups": len(g.children), "prefix_start": first_words(token_ids[members[0]][
                   : min(g.prefix_len, 8 * words)])}
        if g.parent is not None:
            start = plan.groups[g.parent].prefix_len
            row.update(parent_prefix_tokens=start, prefix_own=first_words(token_ids[members[0]][
                start: min(g.prefix_len, start + 8 * words)]))
        out.append(row)
    return out


def _print_groups(groups: list[dict]) -> None:
    """The --groups table; a nested group's last column is its own part, after its parent's prefix."""
    if groups:
        print("largest groups       members  prefix tokens  tokens saved  prefix starts with (a nested group: "
              "its own part)")
    for g in groups:
        shown = (f"+ {g['prefix_own']!r} (after its parent's {g['parent_prefix_tokens']}-token prefix)"
                 if "prefix_own" in g else repr(g["prefix_start"]))
        print(f"                     {g['members']:>7}  {g['prefix_tokens']:>13}  {g['saves_tokens']:>12}  {shown}")


if __name__ == "__main__":
    sys.exit(main())
