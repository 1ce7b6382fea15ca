"""Ingest: a batch file becomes validated, tokenized requests, or one named error per bad line.

The one reading path of `batchllm run`, `batchllm plan` and the multi-GPU and Ray paths:
`prepare_lines` streams the file, skips what a previous run finished (a `ResumeState`), turns
each line's sampling fields into a `SamplingParams` (seeded from the job seed and the line's id
when it has no seed of its own) and tokenizes prompts in batches. A line that cannot be used is
a `LineError`; no line's content can stop the others. `record_for` turns a finished request into
its output record, in the line's own format.

Writes nothing; holds no state between calls.
"""

from __future__ import annotations

import hashlib
import re
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from batchllm.inputs import ContextLengthError, PromptProcessor, TokenizedPrompt
from batchllm.io import openai_batch
from batchllm.io.job import (
    ResumeState,
    as_given_url,
    file_url_path,
    input_changed,
    is_a_file_url,
    is_a_url,
    is_standard_input,
    stream_words,
)
from batchllm.io.jsonl import (
    OPENAI,
    PLAIN,
    BatchLine,
    LineError,
    duplicate_id,
    line_template_kwargs,
    read_batch_lines,
    result_record,
    without_bom,
)
from batchllm.io.reasoning import SKIPS_NO_SPECIAL_TOKENS as REASONING_SHOWS_SPECIAL_TOKENS
from batchllm.io.reasoning import reasoning_parser_named
from batchllm.io.tool_calls import AutoToolChoice, replaced_constraint, served_tool_choice
from batchllm.io.tool_parsers import SKIPS_NO_SPECIAL_TOKENS, reader_for
from batchllm.progress import CountLog, draws_in_place
from batchllm.sampling_params import SamplingParams, in_field_terms, short_repr

__all__ = ["Ingested", "ResponseShape", "LineServing", "ValidLine", "count_input_lines", "prepare_lines",
           "sampling_params_for", "record_for", "input_problem", "serve_tool_choice", "serve_reasoning_parser", "PLAIN",
           "OPENAI"]


class ValidLine(NamedTuple):
    line: BatchLine
    prompt: TokenizedPrompt
    """token_ids as an int32 numpy array."""
    params: SamplingParams


class Ingested(NamedTuple):
    valid: list[ValidLine]
    """Lines to run, in file order."""
    errors: list[LineError]
    """Bad lines without an error record from an earlier run (those are not repeated)."""
    file_format: str
    """PLAIN or OPENAI: the format of most lines; error records of unparseable lines use it."""
    ignored_fields: dict[str, int]
    """Fields ignored in lines (`BatchLine.ignored_fields`) -> the number of lines holding each."""


def input_problem(path: Path) -> str | None:
    """Why the input file cannot be read, or None. Standard input (`-`, or /dev/stdin and the like where they are
    no regular file: a pipe) is refused, naming what to do: a job reads its input more than once (to fingerprint
    it, to count and to run its lines) and again on a resume, which a stream cannot give."""
    if is_standard_input(path):
        return (f"cannot read the input from {stream_words(path)} ({str(path)}): a job reads its input file more than "
                "once (its fingerprint ties the output to it for a resume, then its lines are run) and a resume "
                "reads it again; write it to a file first (e.g. cat x.jsonl > in.jsonl) and give that path")
    if is_a_file_url(path):
        return (f"cannot read input file {as_given_url(path)!r}: it is a file:// URL; give the file's path "
                f"({file_url_path(path)})")
    if is_a_url(path):
        return (f"cannot read input file {as_given_url(path)!r}: it is a URL, which is not downloaded "
                "here (vLLM's run-batch reads one): download it first (e.g. curl -o in.jsonl URL)")
    if path.is_dir():
        return f"cannot read input file {str(path)!r}: it is a directory"
    if not path.exists():
        return f"cannot read input file {str(path)!r}: no such file"
    if not path.is_file():
        return f"cannot read input file {str(path)!r}: not a regular file (it is read twice: to fingerprint and to run)"
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
            for magic, what in _NOT_UTF8_FILES:
                if head.startswith(magic):
                    return (f"cannot read input file {str(path)!r}: it is {what}; a JSONL file is UTF-8 text, one "
                            "JSON per line")
            if problem := _binary_problem(head):
                return (f"cannot read input file {str(path)!r}: it is {problem}; a JSONL file is UTF-8 text, one JSON "
                        "per line")
            if problem := _json_not_jsonl(head):
                return f"cannot read input file {str(path)!r}: {problem}"
            f.seek(0)
            line = _first_line_ending_in_a_lone_carriage_return(f)
    except OSError as e:
        return f"cannot read input file {str(path)!r}: {e.strerror}"
    if line is not None:  # (read as one line, every request after the \r would go unanswered)
        return (f"cannot read input file {str(path)!r}: line {line} ends in a lone carriage return (\\r, old Mac OS "
                "line endings) before the next request; convert them to \\n first (e.g. tr '\\r' '\\n' < in.jsonl "
                "> fixed.jsonl)")
    return None


def _json_not_jsonl(head: bytes) -> str | None:
    """Why a file beginning with `head` is a JSON document rather than JSONL (one request object per line), or None:
    its first non-blank line opens an array (a JSON list of requests: one line, or written across many), or is a
    lone "{" (one object written across lines). Such a first line is never a request. The whole file is refused,
    though a JSONL file with one stray such first line would have run its other lines: far more often the file
    is a JSON document, whose lines would each be recorded as failed and the output marked complete, while
    refused it is converted in one command and run."""
    first = next((line.strip() for line in without_bom(head).splitlines() if line.strip()), b"")
    if first.startswith(b"["):
        return ("it is a JSON array, not JSONL (one JSON object per line); convert it first (e.g. "
                "jq -c '.[]' in.json > in.jsonl)")
    if first == b"{":
        return ("it is JSON written across lines (its first line is a lone '{'), not JSONL (one JSON object per "
                "line); convert it first (e.g. jq -c . in.json > in.jsonl)")
    return None


def _first_line_ending_in_a_lone_carriage_return(f) -> int | None:
    """The number of the first line (as \\n counts them) holding \\r right before a JSON object ("\\r{"): a lone
    carriage return as a line ending, since JSON allows no raw \\r inside a string; None where there is none. The
    whole file is read (in chunks, in C: ~1 s per GB), as a file whose later part alone has such lines (two files
    joined) would run each such run of requests as one malformed line."""
    newlines, previous = 0, b""
    for chunk in iter(lambda: f.read(1 << 20), b""):
        window = previous + chunk
        if (at := window.find(b"\r{")) >= 0:
            return newlines + window.count(b"\n", len(previous), at) + 1  # (none where at < len(previous))
        newlines += chunk.count(b"\n")
        previous = chunk[-1:]
    return None


_NOT_UTF8_FILES = ((b"\x1f\x8b", "gzip-compressed (decompress it first: gunzip -k)"),
                   (b"\xff\xfe", "UTF-16 text (little-endian, as Windows' \"Unicode\"): save it as UTF-8"),
                   (b"\xfe\xff", "UTF-16 text (big-endian): save it as UTF-8"),
                   (b"PK\x03\x04", "a zip archive (extract it first)"),
                   (b"BZh", "bzip2-compressed (decompress it first: bunzip2 -k)"),
                   (b"\xfd7zXZ\x00", "xz-compressed (decompress it first: unxz -k)"),
                   (b"\x28\xb5\x2f\xfd", "zstd-compressed (decompress it first: unzstd)"),
                   (b"PAR1", "a Parquet file (write it as JSONL first: pandas' read_parquet(...).to_json(path, "
                             "orient='records', lines=True))"),
                   (b"ARROW1", "an Arrow file (write it as JSONL first)"),
                   (b"\x93NUMPY", "a NumPy array file"),
                   (b"GGUF", "a GGUF model file (give it as --model)"),
                   (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
                   (b"%PDF-", "a PDF document"))
"""The first bytes of files people hand over as JSONL that are not UTF-8 text (a UTF-8 BOM is read as usual)."""


def _binary_problem(head: bytes) -> str | None:
    """What a file beginning with `head` is where it is no text: a safetensors file (its header's length, then its
    JSON header), UTF-16 text without a byte-order mark (every other byte NUL), or binary data (NUL bytes, which JSON
    text never holds raw: at least 16, and more than 1% of the head; a line or two with a stray NUL stay their own
    lines' errors), else None."""
    if len(head) >= 10 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < (1 << 32):
        return "a safetensors file (a model's weights: give its directory as --model)"
    nuls = head.count(b"\0")
    if nuls < 16 or nuls * 100 <= len(head):
        return None
    even, odd = (half.count(0) / max(len(half), 1) for half in (head[0::2], head[1::2]))
    if max(even, odd) >= 0.9 and min(even, odd) <= 0.1:  # (ASCII as UTF-16: one byte of each pair NUL)
        return "UTF-16 text without a byte-order mark: save it as UTF-8"
    return "binary data (NUL bytes), not text"


def in_the_lines_terms(line: BatchLine, error: ValueError | str) -> str:
    """The error as the line's own fields say it: a plain line's fields are SamplingParams fields of their names,
    and so are an OpenAI line's body fields, but its `top_logprobs` (chat) or `logprobs` (completions), which became
    SamplingParams.logprobs."""
    text = str(error)
    if line.format == OPENAI:
        text = re.sub(r"SamplingParams\.logprobs\b", "top_logprobs" if line.is_chat else "logprobs", text)
    return in_field_terms(text)


def count_input_lines(path: Path) -> int:
    """The number of lines that each get one output record: the non-blank lines (no JSON parsing)."""
    with open(path, "rb") as f:
        return sum(1 for raw in f if without_bom(raw).strip())


def prepare_lines(path: Path, prompts: PromptProcessor, defaults: dict, global_seed: int | None,
                  resume: ResumeState | None = None, progress: bool = False, chunk: int = 1024,
                  serving: LineServing | None = None) -> Ingested:
    """Stream the file and tokenize it in batches, skipping lines a previous run finished. Each line is served as
    `serving` says (`LineServing`, None: the default: its chat template keywords and tools, its tool choice and
    what the reasoning parser sets; an "auto" line the job has no parser for is refused).

    Prompts are kept as int32 numpy arrays and identical sampling settings share one SamplingParams (a seeded
    line's is a slotted copy of it, ~400 bytes, with its own seed: `sampling_params_for`), so memory follows
    the token arrays and the lines' own text, not a SamplingParams per line."""
    resume = resume or ResumeState()
    serving = serving or LineServing()
    valid: list[ValidLine] = []
    errors: list[LineError] = []
    formats: dict[str, int] = {}
    ignored: dict[str, int] = {}
    params_cache: dict[Any, SamplingParams] = {}
    pending: list[tuple[BatchLine, SamplingParams, Any]] = []

    claims = IdClaims()

    def flush() -> None:
        for result in _tokenized(prompts, pending, defaults):
            if isinstance(result, ValidLine) and (duplicate := claims.claim(result.line)) is not None:
                result = duplicate
            (valid if isinstance(result, ValidLine) else errors).append(result)
        pending.clear()

    if progress and not draws_in_place(sys.stderr):  # (into a log: plain lines, as the tokens' progress)
        bar = CountLog("reading", " lines")
    else:
        bar = tqdm(desc="reading", unit=" lines", disable=not progress, dynamic_ncols=True, mininterval=0.1)
    digest = hashlib.sha256() if resume.input_read is not None else None
    for item in read_batch_lines(path, digest):  # (an id goes to the first line accepted: `claims`)
        bar.update(1)
        if isinstance(item, LineError):
            errors.append(item)
            continue
        _tally(item, formats, ignored)
        if item.line_number in resume.done_error_lines:
            continue  # (a line that failed stays failed: a second, result record would answer it twice)
        if resume.is_done(item.request_id):  # the first such line was answered; a later one is its duplicate
            if (duplicate := claims.claim(item)) is not None:
                errors.append(duplicate)
            continue
        prepared = _prepared(item, prompts, defaults, global_seed, params_cache, serving)
        if isinstance(prepared, LineError):
            errors.append(prepared)
            continue
        pending.append((item, *prepared))
        if len(pending) >= chunk:
            flush()
    if pending:
        flush()
    bar.close()
    if digest is not None and digest.hexdigest() != resume.input_read[1]:
        raise input_changed(path, resume.input_read, path.stat().st_size)
    errors = sorted((e for e in errors if e.line_number not in resume.done_error_lines),  # (those: written before)
                    key=lambda error: error.line_number)
    file_format = max(formats, key=formats.get) if formats else PLAIN
    return Ingested(valid, errors, file_format, ignored)


def _tally(line: BatchLine, formats: dict[str, int], ignored: dict[str, int]) -> None:
    """Count the line's format and each field it gave that is ignored (the job's notes on the file)."""
    formats[line.format] = formats.get(line.format, 0) + 1
    for name in line.ignored_fields:
        ignored[name] = ignored.get(name, 0) + 1


class IdClaims:
    """Which line has each id (an OpenAI line's custom_id): the first line that is accepted, so that a line refused
    for its content (a bad temperature, a prompt past the context) leaves its id to a later line with it, and a
    line whose id another has is refused as its duplicate, naming that line. Ids are JSON values: 9 and "9" are two.

    Invariant on resume: every error record of a run is durable before its first answer (`run` syncs them first),
    so a line of an id answered before that has no error record is the line that was answered: the first of them
    claims the id again (`prepare_lines`), and a later one is the duplicate it was."""

    def __init__(self) -> None:
        self._lines: dict[str | int, int] = {}

    def claim(self, line: BatchLine) -> LineError | None:
        """None where `line` takes its id (no line took it before), else its duplicate's LineError."""
        taken = self._lines.setdefault(line.request_id, line.line_number)
        if taken == line.line_number:
            return None
        return LineError.for_line(line, duplicate_id(line.request_id, line.format, taken))


def _prepared(item: BatchLine, prompts: PromptProcessor, defaults: dict, global_seed: int | None,
              params_cache: dict, serving: LineServing) -> tuple[SamplingParams, Any] | LineError:
    """A line's SamplingParams (checked against the model) and its prompt as `tokenize_many` takes it (a chat
    rendered by its template with `serving.template_kwargs`, which the line keeps, as its answer's reasoning split
    reads them), or the LineError of either. The line is served first (`LineServing.serve`: an "auto" line the job
    has no parser for fails). A forced tool call's line compiles its own structured_outputs, which the call's
    constraint replaced (`ForcedToolCall.replaced`), as a line's own: first, so that it fails the line as it would
    without tools."""
    try:
        serving.serve(item)
        if (replaced := replaced_constraint(item.tool_call)) is not None and prompts.grammars is not None:
            prompts.grammars.compile(replaced)
        params = sampling_params_for(item, defaults, global_seed, params_cache)
        params.check_for_model(prompts.vocab_size, prompts.tokenizer, prompts.grammars, prompts.max_logprobs,
                               prompts.eos_token_ids)
        if (item.format == OPENAI and prompts.tokenizer is None and params.logprobs is not None
                and not serving.names_tokens_by_id(item)):
            raise ValueError("logprobs need the tokenizer, which --skip-tokenizer-init leaves out (as vLLM's "
                             "server: an OpenAI response names each token by its text, unless "
                             "return_tokens_as_token_ids is true)")
        if item.is_chat:
            item.chat_template_kwargs = serving.template_kwargs(item)
        prompt = (prompts.apply_chat_template(item.prompt, item.line_number, kwargs=item.chat_template_kwargs)
                  if item.is_chat else item.prompt)
    except ValueError as e:
        return LineError.for_line(item, in_the_lines_terms(item, e))
    except Exception as e:  # whatever a line holds, it costs only that line
        return LineError.for_line(item, f"cannot be prepared ({type(e).__name__}: {short_repr(str(e))})")
    return params, {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt


def _tokenized(prompts: PromptProcessor, pending: list[tuple[BatchLine, SamplingParams, Any]], defaults: dict
               ) -> list[ValidLine | LineError]:
    """The pending lines tokenized in one batch: each a ValidLine, or the LineError of a prompt the tokenizer
    refuses or the model's context cannot take (`defaults`: the run's, for `max_tokens_to_fit`). A line's text is
    dropped once its tokens are made."""
    fits = [max_tokens_to_fit(line, defaults) for line, _, _ in pending]
    truncations = [prompts.truncation_for(params.truncate_prompt_tokens, fit if line.format == OPENAI
                                          else params.max_tokens)  # (vLLM's -1, by format)
                   for (line, params, _), fit in zip(pending, fits)]
    results = prompts.tokenize_many([p for _, _, p in pending], [line.line_number for line, _, _ in pending],
                                    truncations, [line.add_special_tokens for line, _, _ in pending])
    out: list[ValidLine | LineError] = []
    for (line, params, _), fit, result in zip(pending, fits, results):
        if line.echo is None:  # (an echoing line's answer starts with its text)
            line.prompt = None  # the tokens replace the text: never hold both for a whole file
        if isinstance(result, ValueError):
            out.append(LineError.for_line(line, result))
        elif problem := context_limits_problem(params, fit, len(result.array), prompts.max_model_len,
                                               line.format == OPENAI, line.format == OPENAI):
            out.append(LineError.for_line(line, problem))
        else:
            out.append(ValidLine(line, TokenizedPrompt(np.asarray(result.array, dtype=np.int32), None), params))
    return out


def max_tokens_to_fit(line: BatchLine, defaults: dict) -> int | None:
    """The max_tokens that must fit the context after the line's prompt, as vLLM's server checks a request (before
    a --generation-config cap cuts it): an OpenAI line's own max_tokens (or max_completion_tokens), or a
    completion's endpoint default (COMPLETIONS_MAX_TOKENS, vLLM's request default, `defaults`' OPENAI_MAX_TOKENS
    rule). OpenAI's API and vLLM's server (which vLLM's run-batch goes through) refuse a request that does not fit.
    None where generation stops at the context instead (finish_reason "length"): a plain line, as vLLM's
    `LLM.generate`, a chat line without max_tokens, and OpenAI lines whose max_tokens is the command line's."""
    if line.format != OPENAI:
        return None
    own = line.sampling_overrides.get("max_tokens")
    if own is not None:
        return own if type(own) is int else None  # (another type: refused by SamplingParams)
    if not line.is_chat and defaults.get(OPENAI_MAX_TOKENS) in (ENDPOINT_DEFAULTS, MODEL_FOR_CHAT):
        return COMPLETIONS_MAX_TOKENS
    return None


def context_limits_problem(params: SamplingParams, fit: int | None, prompt_tokens: int, max_model_len: int,
                           truncation: bool, min_tokens: bool) -> ValueError | None:
    """The first way a tokenized request fails its context, in the order vLLM's server checks an OpenAI request
    (`run`'s lines and `run --ray`'s rows alike), or None: where `truncation`, its truncate_prompt_tokens beside `fit`
    (`truncation_past_the_context`); its max_tokens `fit` (None: none to fit) beside the prompt
    (`context_overflow`); where `min_tokens`, its min_tokens beside the most it may generate
    (`min_tokens_past_the_context`)."""
    if truncation and (problem := truncation_past_the_context(params.truncate_prompt_tokens, fit, max_model_len)):
        return problem
    if fit is not None and (problem := context_overflow(prompt_tokens, fit, max_model_len)):
        return problem
    if min_tokens and (problem := min_tokens_past_the_context(prompt_tokens, params, max_model_len)):
        return ValueError(problem)
    return None


def min_tokens_past_the_context(prompt_tokens: int, params: SamplingParams, max_model_len: int) -> str | None:
    """Why an OpenAI line's min_tokens passes the most it may generate, or None: vLLM's server takes as max_tokens
    what the context leaves after the prompt, or less where the request, the model's generation_config or a cap
    gives less, and refuses a larger min_tokens (here such a line stopped at the context, its min_tokens not
    honoured). A line whose own max_tokens passes the context is refused by `context_overflow` first."""
    room = max_model_len - prompt_tokens
    if params.min_tokens <= room or (params.max_tokens is not None and params.max_tokens <= room):
        return None  # (a min_tokens past a max_tokens below the room: SamplingParams refuses it first)
    return (f"min_tokens must be <= max_tokens ({room}: what the context of {max_model_len} tokens leaves after the "
            f"{prompt_tokens}-token prompt), got {params.min_tokens}")


def context_overflow(prompt_tokens: int, max_tokens: int, max_model_len: int) -> ContextLengthError | None:
    """Why a prompt and its max_tokens do not fit the context (an error carrying OpenAI's code), or None."""
    if prompt_tokens + max_tokens <= max_model_len:
        return None
    return ContextLengthError(
        f"the model's context (max_model_len) is {max_model_len} tokens, but {prompt_tokens + max_tokens} were asked "
        f"for ({prompt_tokens} in the prompt, {max_tokens} for the completion); lower max_tokens or shorten the prompt")


def truncation_past_the_context(keep: int | None, max_tokens: int | None, max_model_len: int) -> ValueError | None:
    """Why an OpenAI line asks to keep more prompt tokens (`keep`, its truncate_prompt_tokens) than the context leaves
    beside the max_tokens vLLM's server checks (`max_tokens_to_fit`: its own, or a completion's default 16; None,
    a chat's without one, as 0), or None. vLLM refuses it so whatever the prompt's length: a long prompt was refused
    as too long, naming its tokens, not the truncation."""
    max_tokens = max_tokens or 0
    if keep is None or keep == -1 or max_tokens >= max_model_len:  # (the last: no prompt fits beside that
        return None  # max_tokens, whatever its truncation: `context_overflow` says so)
    if keep <= max_model_len - max_tokens:
        return None
    return ValueError(f"truncate_prompt_tokens={keep} cannot be greater than max_model_len - max_tokens = "
                      f"{max_model_len - max_tokens}: ask a smaller truncation size (or -1: what the context leaves)")


def error_code_of(problem: str) -> str | None:
    """The OpenAI error code of a line's problem as text (`run --ray` carries a row's problem as text): OpenAI's
    "context_length_exceeded" for the context's two refusals (`context_overflow`, `inputs.ContextLengthError`),
    recognised by their wording; else None."""
    return ContextLengthError.code if "(max_model_len) is" in problem else None


def serve_tool_choice(line: BatchLine, auto_tool_parser: str | None) -> None:
    """Serve the line's tool choice as the job does (`tool_calls.served_tool_choice`, with the job's parser where
    it serves "auto": ToolChoiceError, a ValueError, for an "auto" line it cannot serve). Under a parser that
    shows special tokens (`tool_parsers.SKIPS_NO_SPECIAL_TOKENS`: vLLM's hermes adjust_request), a line whose
    tools are called or parsed (a forced or "auto" choice) gets skip_special_tokens false over its own, as in
    vLLM. Changes the line in place (its tool_call, and its sampling_overrides by a new dict); idempotent."""
    line.tool_call = served_tool_choice(line.tool_call, auto_tool_parser)
    if line.tool_call is not None and auto_tool_parser in SKIPS_NO_SPECIAL_TOKENS:
        line.sampling_overrides = {**line.sampling_overrides, "skip_special_tokens": False}


def serve_reasoning_parser(line: BatchLine, reasoning_parser: str | None) -> None:
    """What the job's --reasoning-parser sets on a chat line, as vLLM's server sets it on every chat request where a
    reasoning parser is given: under qwen3 (`io.reasoning.SKIPS_NO_SPECIAL_TOKENS`), skip_special_tokens false over
    the line's own (plain `messages` lines too, as `serve_tool_choice` treats them). Completions lines are left as
    they are. Changes the line in place (its sampling_overrides by a new dict); idempotent."""
    if line.is_chat and reasoning_parser in REASONING_SHOWS_SPECIAL_TOKENS:
        line.sampling_overrides = {**line.sampling_overrides, "skip_special_tokens": False}


class LineServing(NamedTuple):
    """How the job serves each line beyond the line's own fields: the one value `run` reads its lines with
    (`prepare_lines`), `run --ray` preprocesses them with (`ray.jsonl_job._CliPreprocess`) and both write records
    with (`ResponseShape.serving`), so the two paths cannot disagree. The default serves nothing extra."""

    template_defaults: dict | None = None
    """--default-chat-template-kwargs: a chat line's template keywords under its own (`jsonl.line_template_kwargs`)."""
    exclude_tools_when_none: bool = False
    """--exclude-tools-when-tool-choice-none: a chat line whose tool_choice is "none" is rendered without its tools."""
    auto_tool_parser: str | None = None
    """--tool-call-parser where --enable-auto-tool-choice is given (`io.tool_parsers.TOOL_PARSERS`): a tool_choice
    "auto" line's answer is read by it (`tool_calls.served_tool_choice`); None: such lines fail."""
    reasoning_parser: str | None = None
    """--reasoning-parser (`io.reasoning.REASONING_PARSERS`): a chat answer's thinking goes to its message's
    `reasoning`; None: the whole answer is its content."""
    tokens_as_ids: bool = False
    """--return-tokens-as-token-ids: OpenAI lines' logprobs name each token "token_id:N" unless the line's own
    return_tokens_as_token_ids says otherwise (`names_tokens_by_id`)."""

    def names_tokens_by_id(self, line: BatchLine) -> bool:
        """Whether the line's logprobs name their tokens by id: its own return_tokens_as_token_ids, else the job's."""
        asks = line.response_asks
        own = asks.tokens_as_ids if asks is not None else None
        return self.tokens_as_ids if own is None else own

    @property
    def parses(self) -> bool:
        """Whether answers go through a parser (reasoning, or tool calls of "auto" lines), as vLLM's server makes one
        for every chat request then."""
        return self.reasoning_parser is not None or self.auto_tool_parser is not None

    def serve(self, line: BatchLine) -> None:
        """Serve the line's tool choice, then what the reasoning parser sets (`serve_tool_choice`: ToolChoiceError
        for an "auto" line the job does not serve; `serve_reasoning_parser`). In place; idempotent."""
        serve_tool_choice(line, self.auto_tool_parser)
        serve_reasoning_parser(line, self.reasoning_parser)

    def template_kwargs(self, line: BatchLine) -> dict:
        """The chat line's template keywords as the job renders it (`jsonl.line_template_kwargs`)."""
        return line_template_kwargs(line, self.template_defaults, self.exclude_tools_when_none)


def sampling_params_for(line: BatchLine, defaults: dict, global_seed: int | None, cache: dict) -> SamplingParams:
    """The line's SamplingParams: its own fields over `defaults`; lines without a seed get one derived
    from `global_seed` and their id. Equal settings but the seed share one object through `cache`; a seeded
    line (its own seed or the derived one: one per line) gets that object `with_seed`, a copy sharing its
    values (~400 bytes, not a SamplingParams of its own per line). Raises ValueError naming the field when a
    value is invalid (the same error as `SamplingParams(**fields)`)."""
    fields = _line_fields(line, defaults)
    if fields.get("seed") in (None, -1) and global_seed is not None:  # (-1: vLLM's "no seed")
        rid = line.request_id  # an integer id tagged: 9 and "9" are two lines, with two seeds
        fields["seed"] = zlib.crc32(f"{global_seed}:{rid if isinstance(rid, str) else f'#{rid}'}".encode())
    seed = fields.pop("seed", None)
    key = _cache_key(fields)
    if key is None:  # values no valid SamplingParams holds: validation names the problem
        return SamplingParams(**fields, seed=seed)
    if key not in cache:
        try:
            cache[key] = SamplingParams(**fields)
        except ValueError:  # the error a check of every field gives, in its order (a bad seed may come first)
            return SamplingParams(**fields, seed=seed)
    no_seed = seed is None or (type(seed) is int and seed == -1)  # (-1: vLLM's "no seed")
    return cache[key] if no_seed else cache[key].with_seed(seed)


OPENAI_MAX_TOKENS = "openai_max_tokens"
"""A key of the run's sampling defaults that is not a SamplingParams field: present where --max-tokens gives no
max_tokens (the run's 256 is then its own default for plain lines only), saying what an OpenAI line without
max_tokens (or max_completion_tokens) generates: ENDPOINT_DEFAULTS, or MODEL_FOR_CHAT where the model's
generation_config.json gives a max_tokens, or TO_THE_CONTEXT in an output begun before completions lines took their
endpoint's default."""
ENDPOINT_DEFAULTS = "chat: to the context; completions: 16"
"""As OpenAI's API and vLLM's server: a chat answer runs up to the context, a completion to
COMPLETIONS_MAX_TOKENS."""
MODEL_FOR_CHAT = "chat: the model's max_tokens; completions: 16"
"""As vLLM's server where the model's generation_config.json gives max_new_tokens: a chat answer takes it, a
completion COMPLETIONS_MAX_TOKENS (its request's own default, which the model's does not replace)."""
TO_THE_CONTEXT = "to the context"
"""Every OpenAI line up to the context: what outputs begun before ENDPOINT_DEFAULTS recorded, and keep on resume."""
COMPLETIONS_MAX_TOKENS = 16
"""The max_tokens of a /v1/completions body that gives none: OpenAI's documented default, and vLLM's."""
OPENAI_MAX_TOKENS_CAP = "openai_max_tokens_cap"
"""A key of the run's sampling defaults that is not a SamplingParams field: where --generation-config names a
folder whose file sets max_new_tokens, the most any OpenAI line generates (vLLM's server-wide limit of that case:
a line's own max_tokens, or its endpoint's default, above it is cut to it)."""
_NOT_FIELDS = (OPENAI_MAX_TOKENS, OPENAI_MAX_TOKENS_CAP)


def sampling_fields_of(defaults: dict) -> dict:
    """The run's sampling defaults that are SamplingParams fields (OPENAI_MAX_TOKENS and its cap left out)."""
    return {k: v for k, v in defaults.items() if k not in _NOT_FIELDS}


def _line_fields(line: BatchLine, defaults: dict) -> dict:
    """The line's own sampling fields over the run's `defaults` (OPENAI_MAX_TOKENS and OPENAI_MAX_TOKENS_CAP
    applied)."""
    fields = sampling_fields_of(defaults)
    rule = defaults.get(OPENAI_MAX_TOKENS) if line.format == OPENAI else None
    if rule == TO_THE_CONTEXT or (rule == ENDPOINT_DEFAULTS and line.is_chat):
        fields["max_tokens"] = None
    elif rule in (ENDPOINT_DEFAULTS, MODEL_FOR_CHAT) and not line.is_chat:
        fields["max_tokens"] = COMPLETIONS_MAX_TOKENS  # (MODEL_FOR_CHAT's chat lines: the model's, in `fields`)
    fields = {**fields, **line.sampling_overrides}
    cap = defaults.get(OPENAI_MAX_TOKENS_CAP) if line.format == OPENAI else None
    asked = fields.get("max_tokens")
    if cap is not None and (asked is None or type(asked) is int and asked > cap):  # (another type: refused later)
        fields["max_tokens"] = cap
    return fields


_SCALARS = (type(None), bool, int, float, str)


def _cache_key(fields: dict) -> tuple | None:
    """A hashable key equal only for identical settings, or None for values that cannot be keyed.

    Each value is keyed with its type: 1, 1.0 and true are equal in Python but not as settings
    (n=true is an error that a cached n=1 must not hide). Only scalars and flat lists of scalars
    are keyed, so a deeply nested or huge value costs no recursion and no text rendering."""
    key = []
    for name in sorted(fields):
        value = fields[name]
        if isinstance(value, _SCALARS):
            key.append((name, type(value), value))
        elif isinstance(value, list) and all(isinstance(x, _SCALARS) for x in value):
            key.append((name, list, tuple((type(x), x) for x in value)))
        else:
            return None
    return tuple(key)


class ResponseShape(NamedTuple):
    """How OpenAI response lines name the model and the chat answer's author, and split its reasoning."""

    model: str
    """The model's name where neither --served-model-name nor the line names one: --model as given, else the
    default model's name."""
    served_models: tuple[str, ...] = ()
    """--served-model-name's names (vLLM's rule: a line naming one of them gets its own name back, any other
    line the first; vLLM refuses a line naming another model, which runs here)."""
    role: str = "assistant"
    """--response-role: the role of a chat answer's message where the template opened a new turn for it."""
    serving: LineServing = LineServing()
    """How the job serves its lines (`LineServing`): its parsers read the answers' reasoning and tool calls."""
    tool_reader: str | None = None
    """The record writers' reader of "auto" answers where the engine's tokenizer needs another than the parser's
    own (`for_tokenizer`); None: the parser's."""
    fingerprint: str | None = None
    """The responses' `system_fingerprint` (vLLM's --fingerprint-mode: `cli.system_fingerprint`); None: null."""

    def for_tokenizer(self, tokenizer) -> ResponseShape:
        """This shape with the reader its tool-call parser reads that tokenizer's answers with, where it is not the
        parser's own (`tool_parsers.reader_for`: vLLM's mistral reads by the vocabulary's [ARGS]); unchanged where
        there is no tokenizer or no parser."""
        parser = self.serving.auto_tool_parser
        if tokenizer is None or parser is None:
            return self
        reader = reader_for(parser, tokenizer.get_vocab())
        return self._replace(tool_reader=reader if reader != parser else None)

    def tool_call_of(self, line: BatchLine):
        """The line's tool call as the job serves it (`tool_calls.served_tool_choice`: an "auto" one with its
        parser, and its reader for the engine's tokenizer), for its record; the line was accepted, so it is
        served."""
        tool_call = served_tool_choice(line.tool_call, self.serving.auto_tool_parser)
        if self.tool_reader is not None and isinstance(tool_call, AutoToolChoice):
            return tool_call._replace(reader=self.tool_reader)
        return tool_call

    def model_of(self, line: BatchLine) -> str:
        if line.model is not None and line.model in self.served_models:
            return line.model
        return self.served_models[0] if self.served_models else line.model or self.model

    def role_of(self, line: BatchLine) -> str:
        """vLLM's rule: `role`, unless the body asked for no generation prompt (add_generation_prompt false, as
        with continue_final_message): the answer then goes on its last message's turn, so takes that role."""
        return line.continued_role or self.role

    def reasoning_split(self, line: BatchLine) -> Callable[[str], tuple[str | None, str | None]] | None:
        """answer text -> (reasoning, content) for the line's chat answers; None where an answer is all content:
        no parser, a completions line, or structured output (its grammar holds from the first token, so the
        answer holds no thinking). The line's chat template keywords decide it for Qwen3 (enable_thinking)."""
        if self.serving.reasoning_parser is None or not line.is_chat or "structured_outputs" in line.sampling_overrides:
            return None
        parser = reasoning_parser_named(self.serving.reasoning_parser)
        return lambda text: parser(text, line.chat_template_kwargs)


def record_for(line: BatchLine, output, names: ResponseShape, tokenizer=None) -> dict:
    """The output record of a finished request, in the line's format (OpenAI lines echo their model
    unless --served-model-name names others: `ResponseShape.model_of`; the tokenizer names an echoed prompt's
    first token)."""
    if line.format == OPENAI:
        top = line.sampling_overrides.get("logprobs") or 0
        top = sys.maxsize if top == -1 else top  # (-1: the whole vocabulary)
        if line.sampling_overrides.get("logprob_token_ids"):
            top = None  # (every entry: the sampled token's and the named ones)
        return openai_batch.success_record(line.request_id, line.url, names.model_of(line), output,
                                           len(output.prompt_token_ids), top, role=names.role_of(line),
                                           echo=line.echo and (line.echo, line.prompt), tokenizer=tokenizer,
                                           reasoning_split=names.reasoning_split(line), asks=line.response_asks,
                                           tool_call=names.tool_call_of(line), parsers=names.serving.parses,
                                           fingerprint=names.fingerprint,
                                           tokens_as_ids=names.serving.names_tokens_by_id(line))
    return result_record(line.request_id, output, len(output.prompt_token_ids), names.tool_call_of(line),
                         names.reasoning_split(line))
