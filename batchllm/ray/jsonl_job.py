"""`batchllm run IN.jsonl -o OUT_DIR --ray`: a JSONL batch file through Ray Data, JSONL shards out.

Each shard line is the record the single-machine CLI writes for that input line (plain or OpenAI
Batch, results and errors alike). Lines are read by one Ray read task per file (`_JsonlLines`:
line numbers and which line has each id need the file's order), parsed and tokenized by CPU tasks, bucketed by
prefix key and run by `num_replicas` engine actors; `_RecordShards` writes the `record` column.

Restarts: Ray Data checkpointing by the `line` column (the 1-based line number) under
OUT_DIR/_checkpoint. A job run again with the same input and OUT_DIR skips the lines whose shard was
committed and writes new shards for the rest (Ray deletes a shard whose checkpoint entry was never
committed); the checkpoint is kept after success, so running a finished job again writes nothing, and
the records counted (a job found complete, the report, --stats) are those of committed shards alone.
OUT_DIR/job.batchllm-state ties the directory to its input and the
options that decide answers (`io.job.tie_directory_to_job`): a restart under another input or other
options is refused, as the single-machine run refuses it. The driver holds OUT_DIR/.batchllm-lock
(`io.job.OutputLock.for_directory`, the lock `run` takes on its output file) for the whole job: a second job on
the same OUT_DIR is refused at once (exit 2) instead of running every line again beside the first. Lines are
counted by line number (the checkpoint entries' ids), never by records: duplicates an older version left are said
and counted once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ray.data.block import BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink, FileBasedDatasource

from batchllm.io.ingest import count_input_lines, input_problem
from batchllm.io.jsonl import OPENAI, PLAIN, BatchLine, LineError, duplicate_id, parse_line, without_bom
from batchllm.ray.config import ProcessorConfig
from batchllm.ray.processor import Processor
from batchllm.sampling_params import SamplingParams

LINE, RAW, DUPLICATE, RECORD = "line", "raw", "duplicate", "record"
CHECKPOINT_DIR = "_checkpoint"


class _JsonlLines(FileBasedDatasource):
    """Rows {line, raw, duplicate} of the non-blank lines of each file (a file is never split, so one task reads it in
    order). Blank is what `io.ingest.count_input_lines` counts as blank: a line holding only whitespace once the UTF-8
    BOM that may open any line is stripped (`jsonl.without_bom`: the first line, or one where a file joined with `cat`
    began), so the rows are exactly the lines the job counts.

    `duplicate` is null where the row's line has its id (an OpenAI line's custom_id), else the number of the line
    that has it. An id goes to the first line with it that the read task accepts (`_accepted_here`: it parses and its
    sampling values are valid under the job's `defaults`), as `run` gives it to the first line accepted
    (`io.ingest.IdClaims`): a line refused for its own fields leaves its id to the next. What needs the model (its
    template, tokenizer, vocabulary, context, KV cache) is checked later, by parallel tasks: a line refused there has
    taken its id already."""

    def __init__(self, paths, rows_per_block: int = 4096, defaults: dict | None = None,
                 auto_tool_parser: str | None = None, input_read: tuple[int, str] | None = None, **kwargs) -> None:
        """input_read: the input's size and SHA-256 the job is tied to (its state file's), which the read must
        read: checked over the whole file before its first row, and over what it read after its last
        (`io.job.InputChanged`: a file changed as the job started ran its new lines under the old fingerprint)."""
        super().__init__(paths, **kwargs)
        self.rows_per_block = rows_per_block
        self.defaults = defaults or {}
        self.auto_tool_parser = auto_tool_parser  # (an "auto" line it does not serve is refused: its id is left)
        self.input_read = input_read

    def _read_stream(self, f, path: str) -> Iterator:
        from batchllm.io.job import input_changed, input_fingerprint, input_read_of

        holders: dict[str | int, int] = {}  # id -> the line that has it
        cache: dict = {}  # (`io.ingest.sampling_params_for`'s: equal settings are checked once)
        lines, raws, duplicates = [], [], []
        digest = None
        if self.input_read is not None:
            if (now := input_read_of(input_fingerprint(Path(path)))) != self.input_read:
                raise input_changed(Path(path), self.input_read, now[0])
            digest = hashlib.sha256()
        for number, raw in enumerate(_lines(f), start=1):
            if digest is not None:
                digest.update(raw)
            if not without_bom(raw).strip():  # (blank as `count_input_lines` and `run` see it)
                continue
            parsed = parse_line(raw, number)
            holder = None
            if isinstance(parsed, BatchLine) and _accepted_here(parsed, self.defaults, cache, self.auto_tool_parser):
                holder = holders.setdefault(parsed.request_id, number)
            lines.append(number)
            raws.append(raw)
            duplicates.append(None if holder == number else holder)
            if len(lines) >= self.rows_per_block:
                yield _rows(lines, raws, duplicates)
                lines, raws, duplicates = [], [], []
        if digest is not None and digest.hexdigest() != self.input_read[1]:
            raise input_changed(Path(path), self.input_read, Path(path).stat().st_size)
        if lines:
            yield _rows(lines, raws, duplicates)


def _rows(lines: list[int], raws: list[bytes], duplicates: list[int | None]):
    """One block of `_JsonlLines` rows."""
    import pyarrow as pa

    return pa.table({LINE: lines, RAW: pa.array(raws, pa.binary()), DUPLICATE: pa.array(duplicates, pa.int64())})


def _accepted_here(line: BatchLine, defaults: dict, cache: dict, auto_tool_parser: str | None = None) -> bool:
    """Whether a parsed line's tool choice is served (`io.ingest.serve_tool_choice`, with the job's "auto" parser)
    and its sampling values make a valid SamplingParams under the job's `defaults` (as `_CliPreprocess` makes it):
    what `run` checks of a line before the model, so that the read task can decide which line has an id. Without
    the job's seed: a seed derived from it is always valid, and a line's own is checked."""
    from batchllm.io.ingest import sampling_params_for, serve_tool_choice

    try:
        serve_tool_choice(line, auto_tool_parser)
        sampling_params_for(line, defaults, None, cache)
    except Exception:  # noqa: BLE001 - any refusal of its values (the tokenize stage names it)
        return False
    return True


def _lines(f, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The file's lines with their b"\\n", as iterating a binary Python file gives them (the
    single-machine reader's error messages quote columns of exactly these bytes)."""
    rest = b""
    while data := f.read(chunk):
        parts = (rest + data).split(b"\n")
        rest = parts.pop()
        yield from (part + b"\n" for part in parts)
    if rest:
        yield rest


def _parse(row: dict) -> BatchLine | LineError:
    """The line as the single-machine reader sees it: a line whose id another line has (`_JsonlLines`' `duplicate`)
    is its duplicate's error, naming that line."""
    parsed = parse_line(row[RAW], row[LINE])
    if isinstance(parsed, BatchLine) and row.get(DUPLICATE):  # (a line number: 1 or more)
        return LineError.for_line(parsed, duplicate_id(parsed.request_id, parsed.format, row[DUPLICATE]))
    return parsed


class _CliPreprocess:
    """Input line -> prompt and sampling fields, with the CLI's defaults and per-line seeds, each line served as the
    job's `serving` says (`io.ingest.LineServing`: its chat template keywords and tools, its tool choice, what the
    reasoning parser sets), as `run` serves it."""

    def __init__(self, defaults: dict, global_seed: int | None, serving=None) -> None:
        from batchllm.io.ingest import LineServing

        self.defaults = defaults
        self.global_seed = global_seed
        self.serving = serving or LineServing()
        self.cache: dict[str, SamplingParams] = {}

    def __call__(self, row: dict) -> dict:
        from batchllm.io.ingest import in_the_lines_terms, max_tokens_to_fit, sampling_params_for
        from batchllm.io.tool_calls import ToolChoiceError, replaced_constraint
        from batchllm.ray.stages import FIT_MAX_TOKENS, NO_MAX_TOKENS, OPENAI_LIMITS, REPLACED_CONSTRAINT

        line = _parse(row)
        if isinstance(line, LineError):
            return {"error": line.message}
        try:
            self.serving.serve(line)
        except ToolChoiceError as e:
            return {"error": LineError.for_line(line, in_the_lines_terms(line, e)).message}
        sp = sampling_params_for(line, self.defaults, self.global_seed, self.cache)
        fields = {name: getattr(sp, name) for name in SamplingParams.field_names()}
        kind = "messages" if line.is_chat else "prompt_token_ids" if isinstance(line.prompt, list) else "prompt"
        prompt = line.prompt if isinstance(line.prompt, dict) else {kind: line.prompt}  # (a dict: ids and their text)
        return {**prompt, "sampling_params": fields, FIT_MAX_TOKENS: max_tokens_to_fit(line, self.defaults),
                OPENAI_LIMITS: line.format == OPENAI,
                NO_MAX_TOKENS: sp.max_tokens is None, "add_special_tokens": line.add_special_tokens,
                REPLACED_CONSTRAINT: replaced_constraint(line.tool_call),
                "chat_template_kwargs": self.serving.template_kwargs(line) if line.is_chat else None}


class _CliRecords:
    """(row, RequestOutput or None, error or None) -> {"record": the CLI's JSON line for it}."""

    def __init__(self, names, file_format: str, tokenizer=None) -> None:
        self.names = names  # io.ingest.ResponseShape (its `serving`: the template keywords a reasoning split reads)
        self.file_format = file_format
        self.tokenizer = tokenizer

    def with_tokenizer(self, tokenizer) -> _CliRecords:
        """This writer, with the engine's tokenizer (it names an echoed prompt's first token, and picks the
        tool-call parser's reader: `ResponseShape.for_tokenizer`): `EngineReplica` calls it once its engine is
        built."""
        return _CliRecords(self.names.for_tokenizer(tokenizer), self.file_format, tokenizer)

    def __call__(self, row: dict, output, error: str | None) -> dict[str, Any]:
        from batchllm.io.ingest import error_code_of, in_the_lines_terms, record_for
        from batchllm.io.job import record_text
        from batchllm.io.openai_batch import with_template_defaults
        from batchllm.io.tool_parsers import ToolParserError

        line = _parse(row)
        if isinstance(line, LineError):
            record = line.record(self.file_format)
        elif error is not None:
            # errors found after parsing are worded as the CLI words them: "line N: <problem>"
            problem = error.split(": ", 1)[1] if error.startswith(f"line {row[LINE]}: ") else error
            record = LineError.for_line(line, in_the_lines_terms(line, problem), error_code_of(problem)
                                        ).record(self.file_format)
        else:
            if line.is_chat:
                line.chat_template_kwargs = with_template_defaults(self.names.serving.template_defaults,
                                                                   line.chat_template_kwargs, line.format == OPENAI)
            try:
                record = record_for(line, output, self.names, self.tokenizer)
            except ToolParserError as e:  # (an answer vLLM's tool parser raises on: the request fails there)
                record = LineError.for_line(line, e).record(self.file_format)
        return {RECORD: record_text(record)}  # (`run`'s line: a lone surrogate escaped, which Arrow cannot encode)


class _RecordShards(BlockBasedFileDatasink):
    """Writes the `record` column, one JSON line per row, one shard per write task."""

    def __init__(self, path: str) -> None:
        super().__init__(path, file_format="jsonl")

    def write_block_to_file(self, block: BlockAccessor, file) -> None:
        records = block.to_arrow().column(RECORD).to_pylist()
        file.write("".join(r + "\n" for r in records).encode("utf-8"))


SAMPLE_LINES = 1000
"""Lines the driver reads itself (the tasks read the file): for the file's format and its ignored fields."""


class FileSample(NamedTuple):
    """What the driver learns from the first SAMPLE_LINES lines, read once."""

    file_format: str
    """The format of most of the parsable lines (PLAIN when none parses): that of unparsable lines' error records."""
    ignored_fields: dict[str, int]
    """Fields of plain lines that are no request field, with how many lines hold each (what `run` without
    --ray names from the whole file)."""


def sample_file(path: Path, sample: int = SAMPLE_LINES) -> FileSample:
    """The `FileSample` of the first `sample` lines of `path`."""
    counts = {PLAIN: 0, OPENAI: 0}
    ignored: dict[str, int] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number > sample:
                break
            line = parse_line(raw, number) if without_bom(raw).strip() else None
            if isinstance(line, BatchLine):
                counts[line.format] += 1
                for name in line.ignored_fields:
                    ignored[name] = ignored.get(name, 0) + 1
    return FileSample(max(counts, key=counts.get), ignored)


def run_jsonl_on_ray(input_path: Path, output_dir: Path, config: ProcessorConfig, sampling_defaults: dict,
                     global_seed: int | None = None, names=None, file_format: str | None = None,
                     on_written: Callable[[], None] | None = None,
                     on_loaded: Callable[[], None] | None = None) -> dict:
    """Run the whole file; returns {"num_records", "num_errors", "wall_s"} over every shard in output_dir (counted by
    line: `count_shard_records`).
    `on_written` is called once every shard is written (before they are counted): the job is done from then on;
    `on_loaded`, by each replica once its engine is built (on its node: a picklable callable).
    `names` (`io.ingest.ResponseShape`): how OpenAI responses name the model (default: its directory's name), and
    how the job serves its lines (`names.serving`, `io.ingest.LineServing`: as `run` reads them, and its parsers
    read the answers);
    `file_format`: that of unparsable lines' error records (default: `sample_file`'s).

    Needs `ray.init()` (or a cluster address) before; output_dir must be reachable from every node."""
    import ray
    from ray.data.checkpoint import CheckpointConfig

    from batchllm.models.default_model import DEFAULT_MODEL_NAME

    output_dir.mkdir(parents=True, exist_ok=True)
    context = ray.data.DataContext.get_current()
    previous = context.checkpoint_config
    context.checkpoint_config = CheckpointConfig(
        id_column=LINE, checkpoint_path=str(output_dir.resolve() / CHECKPOINT_DIR),
        delete_checkpoint_on_success=False)
    started = time.perf_counter()
    try:  # (from here: the datasets below are made under the job's checkpoint config, restored whatever fails)
        if names is None:
            from batchllm.io.ingest import ResponseShape

            names = ResponseShape(Path(config.model).name if config.model else DEFAULT_MODEL_NAME)
        records_fn = _CliRecords(names, file_format or sample_file(input_path).file_format)
        preprocess = _CliPreprocess(sampling_defaults, global_seed, names.serving)
        processor = Processor(config, preprocess, record_fn=records_fn, index_column=LINE, on_loaded=on_loaded)
        lines = ray.data.read_datasource(_JsonlLines([str(input_path.resolve())], defaults=sampling_defaults,
                                                     auto_tool_parser=names.serving.auto_tool_parser,
                                                     input_read=_tied_input(output_dir)))
        records = processor(lines, num_rows=count_input_lines(input_path))
        records.write_datasink(_RecordShards(str(output_dir.resolve())))
    finally:
        context.checkpoint_config = previous  # the context is the driver's: later datasets must not inherit it
    if on_written is not None:
        on_written()
    count = count_shard_records(output_dir)
    return {"num_records": count.num_records, "num_errors": count.num_errors, "wall_s": time.perf_counter() - started}


PENDING_CHECKPOINT = ".pending.parquet"
"""The ending of a checkpoint entry Ray Data has not committed (`ray.data.checkpoint.checkpoint_writer`'s
PENDING_CHECKPOINT_SUFFIX + ".parquet"; a committed one ends in ".parquet" alone)."""


def committed_entries(output_dir: Path) -> list[tuple[Path, list[Path]]]:
    """(committed checkpoint entry, its shards) of `output_dir`. Ray (2.60+) writes a write task's checkpoint entry
    `_checkpoint/<base>.pending.parquet` (the `line` ids of its rows) before its shard `<base>*.jsonl` and renames it
    `<base>.parquet` once the shard is written: a shard whose worker died before the rename (its entry still pending)
    is deleted when the job restarts and its lines run again, and a shard no entry names is not skipped either.
    Neither is a record of the job: only shards whose names begin with a committed entry's base (the longest)."""
    checkpoint = output_dir / CHECKPOINT_DIR
    entries = {entry.name.removesuffix(".parquet"): entry for entry in sorted(checkpoint.glob("*.parquet"))
               if not entry.name.endswith(PENDING_CHECKPOINT)} if checkpoint.is_dir() else {}
    shards: dict[str, list[Path]] = {base: [] for base in entries}
    for shard in sorted(output_dir.glob("*.jsonl")):
        if base := next((shard.name[:end] for end in range(len(shard.name), 0, -1) if shard.name[:end] in shards), ""):
            shards[base].append(shard)
    return [(entry, shards[base]) for base, entry in entries.items()]


def _tied_input(output_dir: Path) -> tuple[int, str] | None:
    """The input's size and SHA-256 that `output_dir`'s state file ties the job to (None: none there to read)."""
    from batchllm.io.job import input_read_of, job_state_path

    try:
        return input_read_of(json.loads(job_state_path(output_dir).read_bytes()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ShardCount(NamedTuple):
    """What the committed shards of a --ray output directory hold, counted by input line (`count_shard_records`)."""

    num_records: int
    """Lines with a record (a result or an error): each line once, however many records it has."""
    num_errors: int
    """Of those, lines whose record is an error."""
    num_duplicates: int = 0
    """Records of a line recorded before: two jobs that wrote one directory at once (a version that did not lock
    it, `io.job.OutputLock.for_directory`). Never counted as lines."""


def count_shard_records(output_dir: Path) -> ShardCount:
    """The `ShardCount` of the committed JSONL shards of `output_dir` (`committed_entries`): what a restart skips, so
    that a job is complete (`_complete_job`) exactly when a restart would run nothing. Records are matched to their
    input lines through their checkpoint entry (the `line` ids of the shard's rows, in its order), so duplicates
    never count as lines (a job is never complete, nor more than complete, by them); an entry that cannot be read, or
    whose ids do not match its records, counts each of its records as a line of its own. A shard an interrupted job
    was writing may end in a torn line: not a record, so not counted."""
    seen: set = set()
    num_errors = num_duplicates = 0
    for entry, shards in committed_entries(output_dir):
        records = [record for shard in shards for record in _shard_records(shard)]
        lines = _entry_lines(entry)
        if lines is None or len(lines) != len(records):
            lines = [(entry.name, k) for k in range(len(records))]
        for line, record in zip(lines, records):
            if line in seen:
                num_duplicates += 1
                continue
            seen.add(line)
            num_errors += bool(record.get("error"))
    return ShardCount(len(seen), num_errors, num_duplicates)


def _shard_records(shard: Path) -> list[dict]:
    """The records of a shard, in its order (a torn or unreadable line is none)."""
    records = []
    for raw in shard.read_bytes().splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        records.append(record if isinstance(record, dict) else {})
    return records


def _entry_lines(entry: Path) -> list[int] | None:
    """The `line` ids a committed checkpoint entry holds, in its order; None where it cannot be read."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(entry, columns=[LINE]).column(LINE).to_pylist()
    except Exception:  # (a damaged entry, another column): its records are counted one line each
        return None


def _note_duplicates(output_dir: Path, count: ShardCount) -> None:
    """Say, where the shards hold records of one line twice, that each line is counted once (and why)."""
    if count.num_duplicates:
        print(f"batchllm: warning: {output_dir} holds {count.num_duplicates} duplicate records (lines recorded twice "
              "by two jobs that wrote it at once, before batchllm locked --ray output directories); each line is "
              "counted once; --overwrite starts over", file=sys.stderr)


def _driver_model_dir(model: str | None) -> Path | None:
    """The model's directory where this (driver) process can see it, for its generation_config.json's
    sampling defaults; None where only the workers hold the model (its defaults then do not apply)."""
    from batchllm.inputs import local_model_dir
    from batchllm.models.spec import ModelLoadError

    if model is None:
        return None  # the embedded default model: its GGUF sets no sampling defaults
    try:
        path = local_model_dir(model)
    except ModelLoadError:
        return None
    return path if path.is_dir() else None


def run_command_on_ray(args) -> int:
    """The `--ray` branch of `batchllm run` (args: the run parser's namespace). The driver holds OUT_DIR's lock
    (`io.job.OutputLock.for_directory`) from before anything in it is read for the job, moved or deleted until the
    job has ended, so a second job on the same OUT_DIR is refused (exit 2) instead of writing every line again."""
    from batchllm.cli import _fail, note_ignored_fields, note_model_defaults
    from batchllm.io.job import JobError, OutputLock

    if problem := input_problem(args.input):
        return _fail(problem)
    if args.stats is not None and (problem := _ray_stats_problem(args)):
        return _fail(problem)  # before the job, as without --ray
    try:
        config, defaults, from_model = _job_config(args)
    except (ValueError, OSError) as e:
        return _fail(str(e))
    note_model_defaults(args, from_model)
    sample = sample_file(args.input)
    note_ignored_fields(sample.ignored_fields, f" (in the first {SAMPLE_LINES:,} lines)")
    if problem := _output_directory_problem(args):
        return _fail(problem)
    try:
        with OutputLock.for_directory(args.output):
            return _run_locked_job(args, config, defaults, sample)
    except JobError as e:
        return _fail(str(e))


def _run_locked_job(args, config: ProcessorConfig, defaults: dict, sample: FileSample) -> int:
    """`run_command_on_ray` once it holds OUT_DIR's lock: the directory prepared, the job run, and what --overwrite
    set aside put back where no replica loaded the model."""
    from batchllm.cli import _fail, keep_the_outputs_openai_rule, results_options
    from batchllm.io.job import job_state_path, restore_overwritten

    defaults = keep_the_outputs_openai_rule(defaults, job_state_path(args.output), args.overwrite)
    try:
        if problem := _prepare_output_directory(args, results_options(args, defaults)):
            return _fail(problem)
        return _run_prepared_job(args, config, defaults, sample)
    finally:  # (a job whose replicas loaded the model, or that finished, has discarded them: nothing to restore)
        if restore_overwritten(args.output):
            print(f"batchllm: no replica loaded the model: the earlier results in {args.output} are kept as they "
                  "were (--overwrite deletes them once the model has loaded)", file=sys.stderr)


def _run_prepared_job(args, config: ProcessorConfig, defaults: dict, sample: FileSample) -> int:
    """`run_command_on_ray` once its output directory is ready (`_prepare_output_directory`): the job, unless it is
    complete; its report and exit status. Each replica discards what --overwrite set aside once it has loaded the
    model (`io.job.discard_overwritten`), and the driver once the job has finished (one with no lines loads none)."""
    import ray

    from batchllm.cli import (
        EXIT_CANNOT_START,
        EXIT_LINES_FAILED,
        EXIT_OK,
        Interrupted,
        _fail,
        _signals_interrupt,
        _write_stats,
        lines_progress_stats,
        response_shape,
    )
    from batchllm.io.job import JobError, discard_overwritten
    from batchllm.models.default_model import DEFAULT_MODEL_NAME
    from batchllm.ray.stages import engine_start_failure

    if (done := _complete_job(args.output, args.input)) is not None:
        return _write_stats(args, {**done, "num_replicas": args.num_replicas}) or (
            EXIT_LINES_FAILED if done["num_errors"] else EXIT_OK)
    if not ray.is_initialized():
        ray.init(address=args.ray_address)  # None: a running cluster if there is one, else a local Ray
    if problem := _unseen_model_problem(args):
        return _fail(problem)
    names = response_shape(args, DEFAULT_MODEL_NAME)  # (args.model names it where given)
    loaded = functools.partial(discard_overwritten, args.output.resolve())  # (run on the replicas' nodes)
    with _signals_interrupt(functools.partial(_rerun_hint, args)) as results_written:  # (results_written: called once
        # every shard is written, a later signal is ignored; a second signal says `_rerun_hint`)
        try:
            result = run_jsonl_on_ray(args.input, args.output, config, defaults, args.seed, names, sample.file_format,
                                      on_written=results_written, on_loaded=loaded)
        except Interrupted as e:
            _report_interrupt(args, signal.Signals(e.signum).name)  # (the status stays the signal's, as in run)
            return 128 + e.signum
        except Exception as e:  # a replica (or tokenize task) that could not use the model says why, as `run` does
            if (problem := engine_start_failure(e)) is not None:
                return _fail(problem)
            if isinstance(cause := _task_cause(e), (JobError, OSError)):  # a write that failed, the input changed
                return _failed_job(args, cause)
            raise  # a failure of the code: the unexpected-failure path (status 3, --debug)
    discard_overwritten(args.output)
    print(f"batchllm: {result['num_records']} records in {args.output} ({result['num_errors']} failed), "
          f"{result['wall_s']:.1f} s", file=sys.stderr)
    num_lines = count_input_lines(args.input)
    if failed := _write_stats(args, {**result, **lines_progress_stats(num_lines, result["num_records"],
                                                                      result["num_errors"]),
                                     "num_replicas": args.num_replicas}):
        return failed
    if result["num_records"] == 0 and num_lines:
        return EXIT_CANNOT_START
    return EXIT_LINES_FAILED if result["num_errors"] else EXIT_OK


def _task_cause(error: BaseException) -> BaseException:
    """The error a Ray task raised, under the wrappers Ray puts around it on the driver (`RayTaskError.cause`, and
    the chained exceptions of Ray Data's own), else `error` itself."""
    seen = 0
    while seen < 10:
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException) or inner is error:
            break
        error, seen = inner, seen + 1
    return error


def _failed_job(args, cause: BaseException) -> int:
    """Say why the job stopped, as `run` says it, and write --stats (`failed`, the lines' counts where the input can
    still be read): a write into OUT_DIR that failed (the OS's reason, with the committed shards kept and what to
    run), another OSError of a task (the file it names: an input moved away), or a JobError's own words (the input
    changed: `io.job.InputChanged`, which says what to run)."""
    from batchllm.cli import _fail, _write_stats, lines_progress_stats

    problem = str(cause)
    if isinstance(cause, OSError):
        where = Path(cause.filename).resolve() if cause.filename else None
        if where is None or where.is_relative_to(args.output.resolve()):  # (a place that became read-only or full)
            problem = (f"cannot write results to {str(args.output)!r}: {cause.strerror or cause}; the records "
                       f"committed so far are kept, {_rerun_hint(args)}")
        else:
            problem = f"a task of the job failed on {str(cause.filename)!r}: {cause.strerror or cause}"
    code = _fail(problem)
    stats: dict = {"failed": problem, "num_replicas": args.num_replicas}
    try:
        count = count_shard_records(args.output)
        stats.update(lines_progress_stats(count_input_lines(args.input), count.num_records, count.num_errors))
    except OSError:  # (the input moved away: no line counts)
        pass
    _write_stats(args, stats)
    return code


def _unseen_model_problem(args) -> str | None:
    """Why --model cannot be used, as `run` says it (`cli.checked_model`), where the driver could not see it
    (`_job_config` checked any model it sees) and the Ray cluster is this node alone: its workers see the same
    files, so the job would only fail there, after starting them. None where it may be used (or a cluster's
    other nodes may hold it: their workers then say what is wrong, `stages.EngineStartError`)."""
    import ray

    from batchllm.cli import checked_model

    if args.model is None or _driver_model_dir(args.model) is not None:
        return None
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) != 1 or nodes[0].get("NodeID") != ray.get_runtime_context().get_node_id():
        return None
    try:
        checked_model(args)
    except (ValueError, OSError) as e:
        return str(e)
    return None


def _complete_job(output_dir: Path, input_path: Path) -> dict | None:
    """--stats of a job whose every line has a record in `output_dir` (said on stderr: nothing to run, so neither
    Ray nor the model starts, and the directory may be read-only), or None where lines are left. Lines are counted
    once however many records they have (`count_shard_records`); duplicates found are said (`_note_duplicates`)."""
    count = count_shard_records(output_dir)
    _note_duplicates(output_dir, count)  # (said before the job too: what it finds is counted by line)
    num_records, num_errors = count.num_records, count.num_errors
    num_lines = count_input_lines(input_path)
    if not num_lines or num_records < num_lines:
        return None
    print(f"batchllm: {output_dir} is already complete ({num_lines} lines: {num_records - num_errors} done, "
          f"{num_errors} failed); nothing to run (--overwrite starts over)", file=sys.stderr)
    from batchllm.cli import lines_progress_stats

    return {"num_records": num_records, "num_errors": num_errors,
            **lines_progress_stats(num_lines, num_records, num_errors), "wall_s": 0.0}


def _ray_stats_problem(args) -> str | None:
    """Why --stats could not be written at the end of a --ray job, or None: as without --ray (`cli._stats_problem`)
    it must be none of the job's files (the input, -o, its state file), nor inside -o, whose files are the job's
    (a .jsonl there would be counted as a shard, any file taken for results)."""
    from batchllm.cli import _stats_problem
    from batchllm.io.job import job_state_path

    inside = args.output.resolve() in args.stats.resolve().parents
    if inside and args.stats.resolve() != job_state_path(args.output).resolve():
        return (f"--stats {str(args.stats)!r} is inside the --ray output directory {str(args.output)!r}, whose files "
                "are the job's shards and checkpoint; choose a path outside it")
    return _stats_problem(args.stats, {"the input file": args.input, "the output directory": args.output,
                                       "the output's state file": job_state_path(args.output)})


def _job_config(args) -> tuple[ProcessorConfig, dict, dict]:
    """(the processor's config, the run's sampling defaults, those the model gave) of `run --ray`'s arguments, with
    what the driver can check before the job (ValueError, OSError): the chat template read (its text travels to the
    tasks and actors, not the path); a model the driver can read, as `run` checks it (`cli.checked_model`: a bad
    config, missing weights or tokenizer fail here, no Ray started), and the reasoning and tool-call parsers against its
    tokenizer.
    A model only the workers' nodes hold is left to them (`_unseen_model_problem`, `stages.EngineStartError`)."""
    from batchllm.cli import check_parsers_tokenizer, checked_model, read_chat_template_once, resolve_sampling_defaults
    from batchllm.options import engine_kwargs_from_args

    read_chat_template_once(args)
    model_dir = _driver_model_dir(args.model)
    if model_dir is not None:  # what `run` checks of the model (config, weights, tokenizer), before Ray starts
        checked_model(args)
    if args.model is None or model_dir is not None:
        check_parsers_tokenizer(args)
    defaults, from_model = resolve_sampling_defaults(args, model_dir)
    engine = {**engine_kwargs_from_args(args), "seed": args.seed or 0}
    named = {k: engine.pop(k) for k in ProcessorConfig.ENGINE_FIELDS if k in engine}
    config = ProcessorConfig(**named, engine_kwargs=engine, num_replicas=args.num_replicas,
                             batch_size=args.ray_batch_size)
    return config, defaults, from_model


def _output_directory_problem(args) -> str | None:
    """Why -o cannot be a --ray job's directory whatever it holds (checked before its lock is taken), or None."""
    from batchllm.io.job import JobError, refuse_output_onto_input

    try:
        refuse_output_onto_input(args.output, args.input)  # (and "-": standard output), as without --ray
    except JobError as e:
        return str(e)
    if args.errors_file is not None:
        return ("--errors-file does not apply with --ray: failed lines are records in the shards, beside the "
                "results (OpenAI Batch lines too)")
    if args.output.exists() and not args.output.is_dir():
        return f"with --ray, -o names a directory for the JSONL shards; {str(args.output)!r} is a file"
    return None


def _prepare_output_directory(args, options: dict) -> str | None:
    """Under OUT_DIR's lock: set what -o holds aside for --overwrite (`io.job.set_aside_for_overwrite`: deleted only
    once a replica has loaded the model) and tie it to the input and `options` (`io.job.tie_directory_to_job`);
    what is wrong, or None."""
    from batchllm.io.job import (
        DIRECTORY_LOCK,
        JobError,
        job_state_path,
        recover_overwrite,
        restore_overwritten,
        set_aside_for_overwrite,
        tie_directory_to_job,
        unowned_directory,
    )

    try:
        if args.output.is_dir():
            recover_overwrite(args.output)  # (what a killed --overwrite left midway)
            if not args.overwrite and restore_overwritten(args.output):  # (one killed before any replica loaded)
                print(f"batchllm: the earlier results an interrupted --overwrite had set aside in {args.output} are "
                      "back (no replica had loaded the model)", file=sys.stderr)
        if args.overwrite and args.output.is_dir():
            held = [p for p in args.output.iterdir() if p.name != DIRECTORY_LOCK]  # (ours: the job holds it)
            if held and not job_state_path(args.output).is_file():
                return f"refusing --overwrite of {unowned_directory(args.output)}"
            if foreign := _not_the_jobs(args.output):
                return (f"refusing --overwrite of {str(args.output)!r}: it holds {', '.join(map(repr, foreign[:5]))}"
                        f"{' ...' if len(foreign) > 5 else ''}, which no batchllm --ray job writes and --overwrite "
                        "would delete (another job's output, an input); move them out, or give another -o")
            set_aside_for_overwrite(args.output)  # start over; deleted once a replica has loaded the model
        tie_directory_to_job(args.output, args.input, options)
    except JobError as e:
        return str(e)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        return f"cannot prepare the --ray output directory {str(args.output)!r}: {e.strerror or e}{where}"
    return _write_problem(args.output, args.input)


SHARD_NAME = re.compile(r"[0-9A-Za-z]+(_[0-9A-Za-z]+)*_\d{6}\.jsonl")
"""A shard's name, as Ray Data's default file names make it: `<dataset uuid>_<write uuid>_<task index>.jsonl`
(`<dataset uuid>_<task index>_<block index>.jsonl` in earlier Ray versions)."""


def _not_the_jobs(output_dir: Path) -> list[str]:
    """The names of `output_dir`'s entries that no `run --ray` job writes (not its state file, checkpoint directory,
    shards, lock, nor what an --overwrite set aside), sorted. A shard is a JSONL file named as Ray names them
    (`SHARD_NAME`) or after a checkpoint entry of the directory, committed or pending (`committed_entries`)."""
    from batchllm.io.job import STATE_TMP_SUFFIX, job_entries, job_state_path

    state = job_state_path(output_dir).name
    ours = {state, state + STATE_TMP_SUFFIX, CHECKPOINT_DIR}
    checkpoint = output_dir / CHECKPOINT_DIR
    bases = [entry.name.removesuffix(PENDING_CHECKPOINT).removesuffix(".parquet")
             for entry in checkpoint.glob("*.parquet")] if checkpoint.is_dir() else []

    def a_shard(path: Path) -> bool:
        return path.is_file() and path.suffix == ".jsonl" and (
            SHARD_NAME.fullmatch(path.name) is not None or any(base and path.name.startswith(base) for base in bases))

    return sorted(p.name for p in job_entries(output_dir) if p.name not in ours and not a_shard(p))


def _write_problem(output_dir: Path, input_path: Path) -> str | None:
    """Why a job with lines left could not write its shards and checkpoint entries into `output_dir`, or None
    (also where every line has a record: a finished job needs no write access). Checked before the model loads,
    as `run` without --ray checks its files: found by Ray, the failure came after the engine ran the lines."""
    from batchllm.io.job import directory_write_problem

    if count_shard_records(output_dir).num_records >= count_input_lines(input_path) > 0:
        return None
    return (directory_write_problem(output_dir, "the --ray output directory")
            or directory_write_problem(output_dir / CHECKPOINT_DIR, "the --ray checkpoint directory"))


def _rerun_hint(args) -> str:
    """What to run to go on after a --ray job stopped with its committed shards kept: the same command skips their
    lines, but with --overwrite it sets OUT_DIR aside again (`io.job.set_aside_for_overwrite`) and computes every line
    anew, so there it is the same command without --overwrite."""
    from batchllm.cli import RESUME_HINT, RESUME_WITHOUT_OVERWRITE_HINT

    return RESUME_WITHOUT_OVERWRITE_HINT if args.overwrite else RESUME_HINT


def _report_interrupt(args, signal_name: str) -> None:
    """Say what an interrupted --ray job left in OUT_DIR and what to run (`_rerun_hint`), and write --stats as `run`
    without --ray does (a failed write is said, not raised). An --overwrite job that no replica had loaded the model
    for puts the earlier results back first (`io.job.restore_overwritten`, which `_run_locked_job` would do after
    this), so that what is said and counted is what OUT_DIR holds: its earlier records, counted as lines where they
    were written for this input and options (`io.job.set_aside_answers_the_job`), else none of this job's."""
    from batchllm.cli import _write_stats, lines_progress, lines_progress_stats
    from batchllm.io.job import restore_overwritten, set_aside_answers_the_job

    answers = args.overwrite and set_aside_answers_the_job(args.output, args.input)
    restored = args.overwrite and restore_overwritten(args.output)
    count = count_shard_records(args.output) if answers or not restored else ShardCount(0, 0)
    num_records, num_errors = count.num_records, count.num_errors
    _note_duplicates(args.output, count)
    num_lines = count_input_lines(args.input)
    progress = lines_progress(num_lines, num_records, num_errors)
    if not restored:
        said = f"{progress}: {num_records} records in {args.output}; {_rerun_hint(args)}"
    elif answers:
        said = (f"{args.output} was not started over and holds its earlier results: {progress}; run the same command "
                "to start over, or it without --overwrite to resume them")
    else:
        said = (f"{args.output} was not started over and holds its earlier records (of other options or another "
                "input) as they were; run the same command to start over")
    print(f"batchllm: interrupted ({signal_name})" + (" before any replica loaded the model" if restored else "")
          + f": {said}", file=sys.stderr)
    stats = {"interrupted": signal_name, "num_records": num_records, "num_errors": num_errors,
             **lines_progress_stats(num_lines, num_records, num_errors),  # (run's names without --ray)
             "num_replicas": args.num_replicas}
    _write_stats(args, stats, "the records written so far are kept")
