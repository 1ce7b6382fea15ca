"""The two stages of the Ray Data processor, as plain functions and classes Ray runs on its workers.

1. `tokenize_batch` (CPU, Ray tasks): user preprocess, chat template, tokenisation, validation,
   sampling parameters (checked against the model, as `LLM` checks them: vocabulary, max_logprobs,
   bad_words, grammars), and the row's prefix key and bucket. A bad row gets its `error` here.
2. `EngineReplica` (an actor: one `batchllm.LLM` each): runs one whole bucket per call, planning
   prefix sharing over everything the call received, and adds the generated columns.

Rows are pyarrow tables between the stages. Internal columns start with `_batchllm_` and are dropped
before the output; the columns below are the output's. Nothing here imports ray at module level
(this module is `batchllm.ray.stages`: `import ray` inside it still means the real ray package).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import numbers
import os
import secrets
import socket
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from batchllm.io.jsonl import PROMPT_FIELDS, add_special_tokens_of, other_input, prompt_kind, without_its_index
from batchllm.ray.config import ProcessorConfig
from batchllm.request_output import output_error
from batchllm.sampling_params import SamplingParams, integers_from_json

logger = logging.getLogger(__name__)

TOKENS, SAMPLING, BUCKET = "_batchllm_token_ids", "_batchllm_sampling", "_batchllm_bucket"
INTERNAL_COLUMNS = (TOKENS, SAMPLING, BUCKET)
PREFIX_KEY, ERROR = "batchllm_prefix_key", "error"
REPLICA, CALL = "batchllm_replica", "batchllm_call"
PREFILL, SHARED_PREFIX, SHARED_PREFIX_LEN = ("batchllm_prefill_tokens", "batchllm_shared_prefix",
                                             "batchllm_shared_prefix_len")
GENERATED_COLUMNS = ("generated_text", "generated_token_ids", "finish_reason", "num_input_tokens",
                     "num_generated_tokens")
MUST_FIT = "max_tokens_must_fit"
"""A preprocess's optional flag: the row's max_tokens must fit the context after its prompt, else the row
is an error (as OpenAI's API answers); without it generation stops at the context ("length")."""
FIT_MAX_TOKENS = "batchllm_max_tokens_to_fit"
"""`run --ray`'s rows (OpenAI lines): the max_tokens that must fit the context after the prompt, as vLLM's server
checks it (`io.ingest.max_tokens_to_fit`: the line's own before a cap, or a completion's default 16), an integer, or
None (then MUST_FIT decides); with OPENAI_LIMITS, also the max_tokens truncation is resolved and checked beside."""
OPENAI_LIMITS = "openai_request_limits"
"""A preprocess's optional flag: the row is an OpenAI request, which vLLM's server refuses where its
truncate_prompt_tokens passes what the context leaves beside the max_tokens it checks (FIT_MAX_TOKENS; none given:
0) or its min_tokens passes the most the row may generate (`io.ingest`'s checks of OpenAI lines)."""
NO_MAX_TOKENS = "max_tokens_none"
"""A preprocess's optional flag: the row runs without max_tokens (vLLM's None: to the context, or to what the
KV cache holds), whatever the config's default. A null max_tokens among its sampling_params cannot say so: there
null is "not given" (Arrow fills a key a row lacks with null)."""
REPLACED_CONSTRAINT = "structured_outputs_replaced"
"""A preprocess's optional value: the grammar key (kind, text) of a structured_outputs the row's own replaced (a
forced tool call's line: `io.tool_calls.ForcedToolCall.replaced`). It is compiled against the model before the
row's own, so that a constraint that fails a line without tools fails it with them too, as `io.ingest` fails it."""


# ---------------------------------------------------------------------- a model that cannot be used
START_FAILURE = "batchllm-engine-start-failure: "
"""What begins an `EngineStartError`'s JSON in Ray's text of a failed task or actor."""


class EngineStartError(RuntimeError):
    """A worker could not use the model (damaged or missing weights, a missing tokenizer, memory refused): raised
    from the original error, with `run`'s one-line reason for it (`cli.engine_start_problem`) as JSON after
    START_FAILURE. Ray keeps only the text of an actor's failed creation (ActorDiedError), so the driver finds the
    reason there (`engine_start_failure`); the traceback above it still shows the original error. Picklable (Ray
    sends it to the driver), as its arguments are kept."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(START_FAILURE + json.dumps({"where": where, "problem": problem}))
        self.where, self.problem = where, problem

    def __reduce__(self):
        return type(self), (self.where, self.problem)


@contextlib.contextmanager
def _engine_start(where: str):
    """Builds what uses the model's files on this worker (`where` it is, for the message): an error that means the
    model cannot be used here (`cli.engine_start_problem`) becomes an `EngineStartError`; any other (a failure of
    the code, an interrupt) passes unchanged."""
    try:
        yield
    except Exception as e:
        from batchllm.cli import engine_start_problem

        if (problem := engine_start_problem(e)) is None:
            raise
        raise EngineStartError(where, problem) from e


def engine_start_failure(error: BaseException) -> str | None:
    """`run`'s one-line reason why a worker could not use the model, where `error` (as Ray raises it on the driver:
    ActorDiedError, a RayTaskError, Ray Data's wrappers, through their causes) carries an `EngineStartError`;
    else None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for line in str(error).splitlines():
            if (at := line.find(START_FAILURE)) >= 0:
                try:  # (the JSON object, whatever Ray's text puts after it)
                    return json.JSONDecoder().raw_decode(line, at + len(START_FAILURE))[0]["problem"]
                except (ValueError, KeyError, TypeError):
                    continue
        error = error.__cause__ or error.__context__
    return None


# ---------------------------------------------------------------------- stage 1: tokenize (CPU)
@lru_cache(maxsize=4)
def _prompt_processor(model: str | None, tokenizer: str | None, max_model_len: int | None, max_logprobs: int,
                      chat_template: str | None, generation_config: str):
    """One tokenizer per worker process and model (Ray reuses worker processes across tasks)."""
    from batchllm.inputs import prompt_processor_for

    return prompt_processor_for(model, tokenizer, max_model_len, max_logprobs, chat_template, generation_config)


def tokenize_batch(batch, *, config: ProcessorConfig, preprocess: Callable | None, num_buckets: int,
                   index_column: str | None = None):
    """pyarrow Table in -> the same rows with the internal columns, `batchllm_prefix_key` and `error`.

    Never raises for a row: a row whose preprocess, template, tokens or sampling values fail gets the
    message in `error` (and empty internal columns) and travels on, so the output has every row."""
    import pyarrow as pa

    with _engine_start("the tokenize stage"):  # (the model's files, not a row: every task would meet it)
        prompts = _prompt_processor(config.model, config.tokenizer, config.max_model_len, config.max_logprobs(),
                                    config.engine_kwargs.get("chat_template"),
                                    config.engine_kwargs.get("generation_config", "auto"))
    defaults = config.sampling_defaults()
    tokens, sampling, keys, buckets, errors = [], [], [], [], []
    for row in batch.to_pylist():
        index = row.get(index_column, 0) if index_column else 0
        try:
            ids, fields, key = _prepare_row(row, preprocess, prompts, defaults, config.prefix_key_tokens, index)
            fields = json.dumps(fields, default=_as_json)  # (its structured outputs as the object they hold)
        except Exception as e:  # noqa: BLE001 - a bad row must never fail the job
            ids, fields, key, error = None, None, None, str(e) or type(e).__name__
            error = error if index_column else without_its_index(error, 0)  # ("prompt 0" named no row)
        else:
            error = None
        tokens.append(ids)
        sampling.append(fields)
        keys.append(key)
        buckets.append(0 if key is None else int(key[:15], 16) % num_buckets)
        errors.append(error)
    columns = {TOKENS: pa.array(tokens, pa.list_(pa.int32())), SAMPLING: pa.array(sampling, pa.string()),
               PREFIX_KEY: pa.array(keys, pa.string()), BUCKET: pa.array(buckets, pa.int64()),
               ERROR: pa.array(errors, pa.string())}
    return _with_columns(batch, columns)


def _plain(value: Any) -> Any:
    """A sampling value with numpy's values as Python's (a numpy array or number, or a list of numpy numbers:
    `list(np.array([2, 3]))`), as a row's Arrow or pandas columns give them; anything else as it is."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, list) and any(isinstance(v, np.generic) for v in value):
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    return value


def _as_json(value: Any) -> Any:
    """A row's sampling value JSON cannot hold as it is: a StructuredOutputsParams (or vLLM's GuidedDecodingParams
    a preprocess gives) as the object of its set fields, a numpy value as the number or list it holds."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"a sampling value of type {type(value).__name__} cannot be read")


def _with_columns(table, columns: dict):
    for name, values in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, values)
        else:
            table = table.append_column(name, values)
    return table


def _prepare_row(row: dict, preprocess, prompts, defaults: dict, key_tokens: int, index) -> tuple[list[int], dict, str]:
    """A row (or what `preprocess` makes of it) -> its prompt's token ids, its sampling fields and its prefix key.

    Read as a plain JSONL line is (`jsonl.prompt_kind`, `jsonl.add_special_tokens_of`: one rule for both), a null
    column being "not given"; raises ValueError naming the row's problem, checked here so that the engine stage
    never meets a bad value nor a row the model cannot serve (nor a `REPLACED_CONSTRAINT` that does not compile)."""
    request = preprocess(row) if preprocess is not None else row  # the input columns travel on anyway
    if not isinstance(request, dict):
        raise ValueError(f"preprocess must return a dict, got {type(request).__name__}")
    if request.get(ERROR):  # a preprocess may reject a row itself
        raise ValueError(request[ERROR])
    given = [k for k in PROMPT_FIELDS if request.get(k) is not None]
    try:
        kind = prompt_kind(request, given)
    except ValueError as e:
        raise ValueError(f"a row: {e}; it gives {', '.join(given) or 'none of them'}") from None
    if given := [f"{name!r} ({why})" for name, value in request.items() if (why := other_input(name, value))]:
        raise ValueError(f"a row: unsupported field(s): {', '.join(given)}")
    add_special = add_special_tokens_of({"add_special_tokens": _plain(request.get("add_special_tokens"))})
    overrides = {k: _plain(v) for k, v in (request.get("sampling_params") or {}).items() if v is not None}
    overrides.pop("detokenize", None)  # generated_text is always filled, as Ray's vLLM processor's own stage does
    overrides.pop("output_kind", None)  # (an enum of the Python API, no row value: every result here is final)
    fields = integers_from_json({**defaults, **overrides})
    if request.get(NO_MAX_TOKENS):
        fields["max_tokens"] = None
    params = SamplingParams(**fields)
    if (replaced := request.get(REPLACED_CONSTRAINT)) is not None and prompts.grammars is not None:
        prompts.grammars.compile(tuple(_plain(replaced)))
    params.check_for_model(prompts.vocab_size, prompts.tokenizer, prompts.grammars, prompts.max_logprobs,
                           prompts.eos_token_ids)
    fit = _max_tokens_to_fit(request, params)
    truncate = prompts.truncation_for(params.truncate_prompt_tokens,
                                      fit if request.get(OPENAI_LIMITS) else params.max_tokens)
    ids, context_len = _row_tokens(request, kind, prompts, truncate, add_special, index)
    from batchllm.io.ingest import context_limits_problem

    openai = request.get(OPENAI_LIMITS)
    if problem := context_limits_problem(params, fit, len(ids), prompts.max_model_len,
                                         truncation=openai or request.get(MUST_FIT), min_tokens=openai):
        raise problem
    explicit = request.get("prefix_key")
    key = prefix_key(ids, key_tokens, context_len, None if explicit is None else str(explicit))
    return list(ids), fields, key


def _max_tokens_to_fit(request: dict, params: SamplingParams) -> int | None:
    """The max_tokens the row's prompt must fit the context beside: FIT_MAX_TOKENS where it is an integer, else its
    own max_tokens where MUST_FIT is true, else None (generation stops at the context)."""
    given = request.get(FIT_MAX_TOKENS)
    if isinstance(given, numbers.Integral) and not isinstance(given, (bool, np.bool_)):
        return int(given)
    return params.max_tokens if request.get(MUST_FIT) else None


def _row_tokens(request: dict, kind: str, prompts, truncate: int | None, add_special: bool | None,
                index) -> tuple[list[int], int | None]:
    """The row's prompt tokens (its `kind` of prompt, `add_special` taken for a text or rendered chat as
    LLM.generate's tokenization_kwargs, never for token ids) and, for a chat of several messages, its
    conversation-before-the-last-message length (`_context_len`; else None)."""
    if kind == "messages":
        from batchllm.io.openai_batch import template_kwargs

        messages, template = request["messages"], template_kwargs(request.get("chat_template_kwargs"))
        text = prompts.apply_chat_template(messages, index, kwargs=template)
        ids = prompts.tokenize_prompt(text, index, truncate, add_special).token_ids
        context_len = None
        if isinstance(messages, list) and len(messages) > 1:
            context_len = _context_len(prompts, messages, template, ids, index, add_special)
        return ids, context_len
    if kind == "prompt":
        return prompts.tokenize_prompt(request["prompt"], index, truncate, add_special).token_ids, None
    text = request.get("prompt")  # (the ids' own text, beside them: kept, not tokenized)
    prompt = {"prompt_token_ids": list(request["prompt_token_ids"]), **({"prompt": text} if text else {})}
    return prompts.tokenize_prompt(prompt, index, truncate).token_ids, None


def _context_len(prompts, messages: list, template: dict | None, ids, index,
                 add_special: bool | None = None) -> int | None:
    """Tokens of the row's prompt that its conversation before the last message, closed, renders to (a prefix
    key's hint); None where the template cannot render that conversation (one that needs a user message,
    as Qwen3's do, fails on a system message alone: the row itself renders, and runs) or it does not fit the
    context untruncated (the row's own prompt, truncated by its truncate_prompt_tokens, may: it runs)."""
    from batchllm.io.openai_batch import BODY_DECIDES

    context_kwargs = {k: v for k, v in (template or {}).items() if k not in BODY_DECIDES}
    try:
        context = prompts.apply_chat_template(messages[:-1], index, add_generation_prompt=False,
                                              kwargs=context_kwargs)
        context_ids = prompts.tokenize_prompt(context, index, add_special_tokens=add_special).token_ids
    except ValueError:
        return None
    return _common_prefix_len(ids, context_ids)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def prefix_key(token_ids: list[int], key_tokens: int, context_len: int | None = None,
               explicit: str | None = None) -> str:
    """A hex digest naming the prefix that decides the row's bucket.

    Rows with equal keys always land in the same engine call. The key covers, in this order of
    preference: the row's own `prefix_key` value (e.g. a document id); for a chat, the conversation
    before its last message (system prompt and earlier turns), at most `key_tokens` tokens; else the
    first `key_tokens` tokens. Never the prompt's last token (it is never shared)."""
    if explicit is not None:
        return hashlib.blake2b(b"explicit:" + explicit.encode(), digest_size=16).hexdigest()
    length = min(key_tokens, len(token_ids) - 1)
    if context_len:
        length = min(length, context_len)
    return _digest(token_ids[:max(length, 0)])


def _digest(token_ids: list[int]) -> str:
    """A hex digest of the token ids (as int64, so that equal ids always give equal digests)."""
    return hashlib.blake2b(np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


# ---------------------------------------------------------------------- stage 2: the engine replica
def replica_engine_options(config: ProcessorConfig) -> dict[str, Any]:
    """One replica's `LLM` keywords: the config's, and where several replicas run, a seed of the replica's own
    (`data_parallel.engine_seed` of a random engine number) for the rows without a seed: with the config's seed on
    each, the replicas' step rows drew the same noise and identical unseeded rows came back as copies. Which replica
    runs a bucket is Ray's choice, so such rows do not repeat between runs of several replicas anyway; seeded rows
    (a row's own seed, or every line's under `run --ray --seed`) are untouched."""
    from batchllm.parallel.data_parallel import engine_seed

    options = config.engine_options()
    if config.num_replicas > 1:
        options["seed"] = engine_seed(options.get("seed") or 0, 1 + secrets.randbelow(1 << 32))
    return options


class EngineReplica:
    """One engine per actor; each call runs one bucket (whole prefix groups) as one planned batch.

    Writer of its own engine only. `record_fn(row, output, error) -> dict` may add columns (the CLI's
    result line); `postprocess(row) -> row` runs last, per row; `on_loaded()` is called once the engine is built
    (`run --ray --overwrite` deletes the earlier results then, not before: a model that cannot load keeps them)."""

    def __init__(self, config: ProcessorConfig, postprocess: Callable | None = None,
                 record_fn: Callable | None = None, on_loaded: Callable[[], None] | None = None) -> None:
        from batchllm.llm import LLM

        self.config = config
        self.postprocess = postprocess
        with _engine_start("a replica"):
            self.llm = LLM(config.model, **replica_engine_options(config))
        if on_loaded is not None:
            on_loaded()
        # a record writer that reads tokens (the CLI's) is handed this engine's tokenizer
        self.record_fn = record_fn.with_tokenizer(self.llm.get_tokenizer()) if hasattr(
            record_fn, "with_tokenizer") else record_fn
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()
        refused = self._refuse_what_the_cache_cannot_hold(rows)
        valid = [i for i, r in enumerate(rows) if not r[ERROR]]
        outputs = self._generate([rows[i] for i in valid])
        for i, output in zip(valid, outputs):  # (a request that failed while it ran: its row's error)
            if (failed := output_error(output)) is not None:
                rows[i][ERROR], refused = failed, True
        call_id = uuid.uuid4().hex[:12]
        stats = _attribute_prefill([rows[i][TOKENS] for i in valid], self.config)
        new: dict[str, list] = {c: [None] * len(rows)
                                for c in (*GENERATED_COLUMNS, PREFILL, SHARED_PREFIX, SHARED_PREFIX_LEN)}
        for i, output, (prefill, shared, shared_len) in zip(valid, outputs, stats):
            first = output.outputs[0]
            values = (first.text, list(first.token_ids), first.finish_reason, len(output.prompt_token_ids),
                      len(first.token_ids), prefill, shared, shared_len)  # (the first completion's, as its text)
            for column, value in zip((*GENERATED_COLUMNS, PREFILL, SHARED_PREFIX, SHARED_PREFIX_LEN), values):
                new[column][i] = value
        types = [pa.string(), pa.list_(pa.int64()), pa.string(), pa.int64(), pa.int64(), pa.int64(), pa.string(),
                 pa.int64()]
        columns = {c: pa.array(new[c], t) for c, t in zip(new, types)}
        if refused:
            columns[ERROR] = pa.array([r[ERROR] for r in rows], pa.string())
        columns[REPLICA] = pa.array([self.replica_id] * len(rows), pa.string())
        columns[CALL] = pa.array([call_id] * len(rows), pa.string())
        if self.record_fn is not None:
            by_row = dict(zip(valid, outputs))
            extra = [self.record_fn(r, by_row.get(i), r[ERROR]) for i, r in enumerate(rows)]
            for name in (extra[0] if extra else {}):
                columns[name] = pa.array([e[name] for e in extra])
        table = _with_columns(batch, columns).drop_columns(list(INTERNAL_COLUMNS))
        if self.postprocess is None:
            return table
        return _table_of_rows([_postprocess_row(self.postprocess, r) for r in table.to_pylist()])

    def _refuse_what_the_cache_cannot_hold(self, rows: list[dict]) -> bool:
        """Set `error` on each row whose request could not fit this engine's KV cache even alone
        (`LLM.kv_cache_problem`): it would stop the engine, and the restarted replica would meet it again.
        Whether any row was refused."""
        refused = False
        for row in rows:
            if not row[ERROR] and (problem := self.llm.kv_cache_problem(
                    len(row[TOKENS]), _sampling_params(row[SAMPLING]))):
                row[ERROR], refused = problem, True
        return refused

    def _generate(self, rows: list[dict]) -> list:
        from batchllm.inputs import TokenizedPrompt

        if not rows:
            return []
        prompts = [TokenizedPrompt(row[TOKENS], None) for row in rows]
        params = [_sampling_params(row[SAMPLING]) for row in rows]
        results: list = [None] * len(rows)
        for index, output in self.llm.iter_generate(prompts, params, use_tqdm=False):
            results[index] = output
        stats = self.llm.last_stats
        logger.info("replica %s: %d rows, saving ratio %.3f", self.replica_id, len(rows),
                    stats.get("saving_ratio", 0.0))
        return results


@lru_cache(maxsize=256)
def _sampling_params(key: str) -> SamplingParams:
    """A row's SamplingParams from its `_batchllm_sampling` JSON (rows with equal settings share one)."""
    return SamplingParams(**json.loads(key))


def _postprocess_row(postprocess: Callable, row: dict) -> dict:
    """The user's postprocess of a row; a failed row (its `error` set) passes by it as it is, as Ray's vLLM
    processor passes error rows by (a postprocess reading generated_text would fail on it and hide the error)."""
    if row.get(ERROR):
        return row
    try:
        return postprocess(row)
    except Exception as e:  # noqa: BLE001 - one row's postprocess must not fail the job
        return {**row, ERROR: f"postprocess failed: {e}"}


def _table_of_rows(rows: list[dict]):
    """A table of every row's every column (a column a row lacks is null there): pyarrow takes the columns of
    the first row only, which dropped the answers of good rows after a failed first row, and the errors after a
    good one."""
    import pyarrow as pa

    names = list(dict.fromkeys(name for row in rows for name in row))
    full = [{name: row.get(name) for name in names} for row in rows]
    try:
        return pa.Table.from_pylist(full)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column of mixed types (a postprocess's fallback values): as
        import pandas as pd  # Ray's own map keeps them, as Python objects (the generated answers are not lost)

        return pd.DataFrame(full, columns=names)


def _attribute_prefill(token_ids: list[list[int]], config: ProcessorConfig) -> list[tuple[int, str | None, int]]:
    """Per row: (prefill tokens charged to it, digest of its top-level shared prefix or None, that
    prefix's length), from the plan the engine follows for this call (one request per row).

    Each group's own segment is charged to its first member, so the rows' charges add up to the
    plan's prefill tokens exactly; the digests let the report find prefixes computed by several calls."""
    from batchllm.prefix import plan_prefix_sharing

    if not token_ids:
        return []
    plan = plan_prefix_sharing(token_ids, mode=config.plan_mode, share=config.prefix_sharing)
    charged = [0] * len(token_ids)
    top: list[tuple[str | None, int]] = [(None, 0)] * len(token_ids)
    for g in plan.groups:
        members = plan.prompts_under(g.group_id)
        base = plan.groups[g.parent].prefix_len if g.parent is not None else 0
        charged[min(members)] += g.prefix_len - base
        for p in g.prompts:
            charged[p] += len(token_ids[p]) - g.prefix_len
        if g.parent is None:
            digest = _digest(token_ids[members[0]][:g.prefix_len])
            for p in members:
                top[p] = (digest, g.prefix_len)
    for p in plan.ungrouped:
        charged[p] += len(token_ids[p])
    return [(c, d, n) for c, (d, n) in zip(charged, top)]
