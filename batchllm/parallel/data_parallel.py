"""Data parallelism inside a node: one engine process per GPU (or per tensor-parallel group), or
several per GPU (`engines_per_gpu`: a small model's host work then overlaps another engine's steps).

The parent (the `LLM` the user holds) tokenizes and validates the input, plans prefix sharing over
the whole batch once, partitions the plan (`partition.py`: whole groups per rank, balanced by cost,
a tail queue of cheap shards), and collects results: it stays the only writer of whatever the
caller writes. Workers never talk to each other, so one finishing early cannot hang the rest.

Process layout and what crosses: one duplex pipe per worker, pickled messages, nothing per step:
  parent -> rank r: ("job", job id, pinned items) | ("shard", job id, items or None) | None (exit)
  rank r -> parent: ("ready", {import_s, build_s, build_phases, torch_threads, kv_tokens, kv_block_size, device,
                               dtype})
                    | ("pull", job id)
                    | ("result", job id, [(index, RequestOutput)]) | ("done", job id, stats) | ("error", message)
where items are a `shard_wire.PackedItems` (packed from each prompt's `TokenizedPrompt.array`). A
result comes back without its prompt and prompt token ids (the parent puts them back). A worker asks
for a tail shard ("pull") whenever its engine has admitted everything it holds
(`LLM.iter_generate(refill=...)`); the parent, the tail's only owner, answers with the next shard or
None. Private pipes mean a worker killed in the middle of a write cannot block the others (a shared
multiprocessing queue's lock would), and its death closes its pipe, which the parent sees at once.

Each engine keeps the KV its finished sequences leave for later calls; the parent remembers what each rank finished
(`kept_placement.py`) and places a later call's prompts where their leading tokens are (`partition.py`).

A worker that dies (killed, OOM, CUDA error) ends the job with `WorkerDied` once the other ranks
have finished their work (their results are yielded first); the engine is then closed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Any

from batchllm.config import EngineConfig, ParallelConfig, SharingConfig, leaves_activation_reserve
from batchllm.core.policies import output_budget
from batchllm.parallel.held_signals import signals_held
from batchllm.parallel.kept_placement import KeptPlacement
from batchllm.parallel.partition import Partition, Shard, TailQueue, partition_plan
from batchllm.parallel.shard_wire import PackedItems, pack_items
from batchllm.prefix import plan_prefix_sharing
from batchllm.progress import TokenProgress

logger = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    """A data-parallel worker ended before its work was done; the message names it and the cause."""


DRAIN_TIMEOUT_S = 600.0
"""How long the next call waits for the ranks of an aborted job to report it done (each stops at its next step)
before it closes the engine: a rank that never does is stuck."""


class DataParallelEngine:
    """The parent's side: starts and supervises `num_engines` worker processes (data_parallel_size
    GPUs or tensor-parallel groups x engines_per_gpu), each a full engine (`LLM`) on its own
    device(s), and runs `generate` calls over them. This side imports no torch: `batchllm run`
    starts the workers before it loads anything heavy itself."""

    def __init__(self, config: EngineConfig, model_dir: Path, max_model_len: int, worker_main=None) -> None:
        """Spawn the workers and return at once (they import and build meanwhile); `wait_ready`
        waits for them. worker_main: what each worker process runs, `(rank, size, config, conn)`
        with the job's config (the model directory filled in; `rank_config` gives the rank's own);
        None: the real worker (`_worker_main`). `benchmarks/dp_overhead.py` passes one without a model."""
        self.size = config.parallel.num_engines
        self.parallel = config.parallel
        self.sharing = config.sharing
        self.max_model_len = max_model_len
        job_config = dataclasses.replace(config, model=dataclasses.replace(config.model, model=str(model_dir)))
        ctx = mp.get_context("spawn")
        self.processes, self.conns = [], []
        self._spawned = time.perf_counter()
        for rank in range(self.size):
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(target=worker_main or _worker_main, name=f"batchllm-dp{rank}", daemon=True,
                            args=(rank, self.size, job_config, child_end))
            p.start()
            child_end.close()  # the worker's end lives in the worker: its death closes the pipe here
            self.processes.append(p)
            self.conns.append(parent_end)
        self.closed: str | None = None
        """Why the engine can no longer run jobs (a worker died), or None."""
        self._job = 0
        self._busy = False
        """A job was handed out and not every rank has finished it (the caller stopped early)."""
        self._unreported: set[int] = set()
        """The ranks given the job handed out last that have not reported it done (counted as each "done" is read,
        in `_messages`: however its reader ends, a report read is never waited for again). Empty once a job ends
        whole; not `_busy` with some left: the job was aborted, and they may still send its results
        (`_drain_aborted`)."""
        self._reset_pending = False
        """`reset_prefix_cache` was asked while a job ran: the workers get it before the next job."""
        self._kept: KeptPlacement | None = None
        """What each rank finished in earlier calls, once every rank reported its cache (`_kept_placement`)."""
        self.last_stats: dict[str, Any] = {}
        self.start_times: dict[int, dict[str, float | int]] = {}
        """Per rank, seconds from spawning until this side saw it ready (`ready_s`: `run` looks only
        after its own start-up) and, from the real worker, its parts: importing torch and the engine
        (after the spawned process started) and building it; and its torch CPU threads (`engine_threads`)."""

    def _messages(self, ranks: set[int], timeout_s: float) -> list[tuple[int, tuple | None]]:
        """(rank, message) for each message that arrives within `timeout_s` from these ranks, all read before
        any is handled (a caller that resumes later, after another call read the pipes, waits on no pipe); a
        rank whose pipe closed (the worker died) gives (rank, None). A rank's "done" of the job handed out last is
        counted here, as it is read (`_unreported`)."""
        by_conn = {self.conns[r]: r for r in ranks}
        messages = []
        for conn in mp_connection.wait(list(by_conn), timeout_s):
            rank = by_conn[conn]
            try:
                with signals_held():  # (a message read part-way would leave the rest to be read as the next one)
                    message = conn.recv()
                    if message[0] == "done" and message[1] == self._job:  # (an interrupt comes after this)
                        self._unreported.discard(rank)
            except (EOFError, OSError, pickle.UnpicklingError):
                message = None
            messages.append((rank, message))
        return messages

    def wait_ready(self, timeout_s: float = 1800.0) -> None:
        """Return once every worker has built its engine; a worker that fails to start (or none
        ready within `timeout_s`) stops them all and raises WorkerDied naming it and the cause. An interrupt
        while they build stops them too (they leave Ctrl-C to this process: `_worker_main`)."""
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        waiting = set(range(self.size)) - set(self.start_times)
        deadline = time.monotonic() + timeout_s
        while waiting:
            if time.monotonic() > deadline:
                self.shutdown()
                raise WorkerDied(f"data-parallel workers did not start within {timeout_s:.0f} s")
            for rank, message in self._messages(set(waiting), 1.0):
                if message is None or message[0] == "error":
                    why = message[1] if message else self._died_before_ready(rank)
                    self.shutdown()
                    raise WorkerDied(f"data-parallel worker {rank} could not start: {why}")
                waiting.discard(rank)
                parts = message[1] if len(message) > 1 else {}  # the real worker's start-up seconds and threads
                self.start_times[rank] = {"ready_s": time.perf_counter() - self._spawned, **parts}
                logger.info("data-parallel worker %d ready: %s", rank, describe_start(self.start_times[rank]))

    def _died_before_ready(self, rank: int) -> str:
        """How a worker that sent nothing ended; one that exited with status 1 so early raised before
        `_worker_main` ran (which reports its own errors): the script's top level, run again there."""
        code = self._exit_code(rank)
        return _exit_description(code) + (f" ({NOT_STARTED_HINT})" if code == 1 else "")

    def _exit_code(self, rank: int) -> int | None:
        self.processes[rank].join(5)
        return self.processes[rank].exitcode

    def generate(self, prompts: Sequence, params: Sequence, *, use_tqdm: bool | Callable[..., Any] = True,
                 progress_desc: str = "Processed prompts",
                 on_dispatched: Callable[[], None] | None = None) -> Iterator[tuple[int, Any]]:
        """Plan, partition and run one batch over the workers; yield (prompt index, RequestOutput)
        as results arrive (any order). on_dispatched: called once every rank has its job (a failure before
        leaves the call's prompts unsent: `LLM.wait_for_completion` keeps them queued)."""
        if self.closed:
            raise WorkerDied(f"the data-parallel engine is closed: {self.closed}")
        if self._busy:  # a call still open (its generator neither finished nor closed): its job is dropped first
            self._abort(self._job)
        self._drain_aborted()
        if self._reset_pending:  # (asked while that call ran)
            self._reset_pending = False
            self.reset_prefix_cache()
        started = time.perf_counter()
        sharing = self.sharing
        arrays = [p.array for p in prompts]  # made once, by validation: for the plan and the pipes
        partition, budgets = self._partition(arrays, params, sharing)
        plan_seconds = time.perf_counter() - started
        self._job += 1

        def pack(shards: Sequence[Shard]) -> PackedItems:  # for the pipes, from the prompts' token arrays
            indices = [i for shard in shards for i in shard.prompts]
            return pack_items(indices, [arrays[i] for i in indices], [params[i] for i in indices])

        tail, job = TailQueue(partition.queue), self._job
        # (made before the job goes out: a bar that cannot be made leaves no job running unread)
        progress = _JobProgress(progress_desc, use_tqdm, budgets, sum(len(a) for a in arrays),
                                sum(p.n for p in params))
        self._busy = True  # until every rank has reported this job: shutdown() then stops them at once
        self._unreported = set()  # (the ranks given it: an interrupt part-way leaves the others out of it)
        try:
            for rank in range(self.size):
                if not self._sent(rank, ("job", job, pack(partition.pinned[rank]))):
                    self._close(f"data-parallel worker {rank} {_exit_description(self._exit_code(rank))} "
                                "between jobs")
                    raise WorkerDied(f"{self.closed}; no request of this call ran (build a new LLM, or run the job "
                                     "again to resume it)")
                self._unreported.add(rank)
        except BaseException:
            progress.close()
            raise
        dispatch_seconds = time.perf_counter() - started - plan_seconds
        if on_dispatched is not None:
            on_dispatched()
        finished = False
        try:
            rank_stats = yield from self._collect(job, prompts, tail, pack, progress, started)
            finished = True
        finally:
            progress.close()
            if not finished and job == self._job and self._busy:
                # the caller stopped reading this call (an interrupt, a closed iterator): its workers stop too.
                # (A generator of an earlier call closed later aborts nothing: its job was dropped already.)
                self._abort(job)
        self._busy = False
        self.last_stats = _job_stats(rank_stats, partition, sharing, self.parallel, time.perf_counter() - started,
                                     plan_seconds)
        self.last_stats["dispatch_seconds"] = dispatch_seconds

    def _sent(self, rank: int, message: tuple | None) -> bool:
        """Send `message` to a worker, whole (an interrupt waits for its end: a message cut part-way would leave the
        worker reading the next one as its rest); False where its pipe is broken (the worker died)."""
        try:
            with signals_held():
                self.conns[rank].send(message)
            return True
        except (OSError, ValueError):
            return False

    def reset_prefix_cache(self) -> None:
        """Ask every live worker to forget the KV its finished sequences left (`LLM.reset_prefix_cache`); each
        does so before the next job, which comes after this message on its pipe. While a job runs (a suspended
        call's), the message waits for the next call: a worker in a job reads nothing but its shards and aborts."""
        if self._busy:
            self._reset_pending = True
            return
        if self._kept is not None:
            self._kept.clear()
        for rank, process in enumerate(self.processes):
            if process.is_alive():
                self._sent(rank, ("reset_prefix_cache",))

    def _close(self, why: str) -> None:
        """A worker died: stop the others (the job is dropped); every later call raises WorkerDied with `why`."""
        self.closed = why
        self.shutdown()

    def _abort(self, job: int) -> None:
        """Ask every live worker to drop `job` (it stops before its next step or at its shard request, and
        reports the job done); they went on with the whole abandoned job, and a next call waited for it. The
        job is no longer this side's to wait for once every abort is sent (interrupted part-way, the next call
        aborts it again: a rank left in it would read the next job as a protocol error); the next call reads what
        the ranks still send of it first (`_drain_aborted`)."""
        for rank, process in enumerate(self.processes):
            if process.is_alive():
                self._sent(rank, ("abort", job))
        self._busy = False

    def _drain_aborted(self) -> None:
        """Read, and drop, what the ranks send of the job last aborted, up to each one's "done": a rank blocked
        writing its results into a full pipe reads no abort, and the next job, sent before anything was read, left
        both sides blocked. A rank that fails meanwhile closes the engine, as between jobs. Called with no job
        running (`generate` aborted any first), so the ranks `_unreported` lists are an aborted job's."""
        began, said = time.monotonic(), False
        while self._unreported:  # (each "done" read is counted by `_messages`)
            for rank, message in self._messages(set(self._unreported), 1.0):
                if message is None or message[0] == "error":
                    why = message[1] if message else _exit_description(self._exit_code(rank))
                    self._close(f"data-parallel worker {rank} failed while dropping an earlier call's job: {why}")
                    raise WorkerDied(f"{self.closed}; no request of this call ran (build a new LLM)")
            waited = time.monotonic() - began
            if waited > 30 and not said:
                said = True
                logger.warning("waiting for data-parallel rank(s) %s to drop an earlier call's job",
                               ", ".join(map(str, sorted(self._unreported))))
            if waited > DRAIN_TIMEOUT_S:
                self._close(f"data-parallel rank(s) {', '.join(map(str, sorted(self._unreported)))} did not drop an "
                            f"earlier call's job within {DRAIN_TIMEOUT_S:.0f} s")
                raise WorkerDied(f"{self.closed}; no request of this call ran (build a new LLM)")

    def _partition(self, ids: Sequence, params: Sequence, sharing: SharingConfig) -> tuple[Partition, list[int]]:
        """The partition, and each prompt's decode budget (all its completions' output tokens)."""
        plan = plan_prefix_sharing(ids, mode=sharing.plan_mode, share=sharing.prefix_sharing)
        expected = [sp.n * output_budget(len(p), sp.max_tokens, 0, self.max_model_len) for p, sp in zip(ids, params)]
        kept = self._kept_placement()
        held = kept.tokens_held(ids) if kept else None
        return partition_plan(plan, expected, self.size, held=held), expected

    def _kept_placement(self) -> KeptPlacement | None:
        """The parent's memory of what each rank finished, made once every rank reported its cache's tokens and
        block size (a stand-in worker reporting neither gets none), where the engines keep KV (with prefix sharing)."""
        if self._kept is None and self.sharing.prefix_sharing:
            reported = [self.start_times.get(r, {}) for r in range(self.size)]
            tokens = [r.get("kv_tokens") for r in reported]
            block_sizes = {r.get("kv_block_size") for r in reported}
            if all(isinstance(t, int) for t in tokens) and len(block_sizes) == 1 and isinstance(*block_sizes, int):
                self._kept = KeptPlacement(tokens, block_sizes.pop())
        return self._kept

    def _refuse_if_dropped(self, job: int) -> None:
        """Raise RuntimeError where a later call started while `job`'s was left open (its job was dropped then,
        and the later call read its workers' messages): read again, it would wait forever."""
        if job != self._job:
            raise RuntimeError(f"this generate call (job {job}) was dropped when a later one started")

    def _collect(self, job: int, prompts: Sequence, tail: TailQueue, pack: Callable, progress: _JobProgress,
                 started: float):
        """Yield results until every rank is done or dead, handing tail shards to ranks that ask;
        returns the ranks' stats."""
        stats: dict[int, dict] = {}
        failed: dict[int, str] = {}
        while len(stats) + len(failed) < self.size:
            self._refuse_if_dropped(job)
            for rank, message in self._messages(set(range(self.size)) - set(stats) - set(failed), 1.0):
                self._refuse_if_dropped(job)
                if message is None:
                    failed[rank] = _exit_description(self._exit_code(rank))
                elif message[0] == "error":
                    failed[rank] = message[1]
                elif message[1] != job:
                    continue  # from an earlier job the caller stopped reading
                elif message[0] == "pull":
                    shard = tail.pop(rank)
                    if not self._sent(rank, ("shard", job, pack([shard]) if shard else None)):
                        failed[rank] = _exit_description(self._exit_code(rank))
                elif message[0] == "result":
                    for index, output in message[2]:
                        output.prompt, output.prompt_token_ids = prompts[index].text, prompts[index].token_ids
                        if self._kept is not None:
                            self._kept.record(rank, prompts[index].array, output)
                        progress.finished(index, output)
                        yield index, output
                        self._refuse_if_dropped(job)  # (resumed after a later call started)
                elif message[0] == "done":
                    stats[rank] = {**message[2], **self.start_times.get(rank, {}), "rank": rank,
                                   "finish_s": time.perf_counter() - started}
        if failed:
            reasons = "; ".join(f"rank {r}: {why}" for r, why in sorted(failed.items()))
            self._close(f"data-parallel worker(s) failed ({reasons})")
            raise WorkerDied(f"{self.closed}; the other ranks' finished results were returned, "
                             "the failed ranks' unfinished requests were not (run the same job again to resume)")
        return [stats[r] for r in range(self.size)]

    def shutdown(self, timeout_s: float = 30.0) -> None:
        busy = self._busy or bool(self._unreported)  # (an aborted job's ranks may be blocked writing its results)
        for rank, p in enumerate(self.processes):
            if p.is_alive() and not busy:
                self._sent(rank, None)
        for rank, p in enumerate(self.processes):
            # a job abandoned mid-way (interrupt), or a worker still building: it would not read the stop soon
            if (busy or rank not in self.start_times) and p.is_alive():
                p.terminate()
            p.join(timeout_s)
            if p.is_alive():
                p.kill()
                p.join(5)
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []
        self.closed = self.closed or "shut down"


class _JobProgress:
    """The token progress of a data-parallel job, from finished prompts only (the parent sees no steps): prefill
    computed (a prompt's tokens less those its engine read from the KV cache, `num_cached_tokens`: a shared prefix,
    or KV an earlier call kept, which one engine's bar counts as input done instead) and output tokens, against
    prompt tokens + decode budgets, each finished prompt giving back the budget it did not use and the prompt tokens
    it did not compute. Requests: prompts, or completions for a vLLM bar (`TokenProgress.counts_completions`)."""

    def __init__(self, desc: str, enabled: bool | Callable[..., Any], budgets: list[int], prompt_tokens: int,
                 completions: int) -> None:
        self.bar = TokenProgress(desc, enabled, requests=completions)
        self.budgets = budgets
        self.planned = prompt_tokens + sum(budgets)
        self.completions = completions
        self.input_tokens = self.output_tokens = self.done = self.completions_done = 0

    def finished(self, index: int, output) -> None:
        produced = sum(len(o.token_ids) for o in output.outputs)
        cached = output.num_cached_tokens or 0
        self.input_tokens += len(output.prompt_token_ids) - cached
        self.output_tokens += produced
        self.planned -= max(0, self.budgets[index] - produced) + cached
        self.done += 1
        self.completions_done += len(output.outputs)
        self._show()

    def close(self) -> None:
        self._show(force=True)
        self.bar.close()

    def _show(self, force: bool = False) -> None:
        done, total = ((self.completions_done, self.completions) if self.bar.counts_completions
                       else (self.done, len(self.budgets)))
        self.bar.update(input_tokens=self.input_tokens, output_tokens=self.output_tokens, planned_tokens=self.planned,
                        requests_done=done, requests_total=total, force=force)


NOT_STARTED_HINT = ("its traceback is above; a script that starts engine processes (tensor_parallel_size or "
                    "data_parallel_size above 1) must create its LLM under `if __name__ == \"__main__\":`, "
                    "since each process is spawned and imports the script again")
"""Why a spawned rank ends before it runs any of our code, nearly always: the script's top level ran again there."""


def _exit_description(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _job_stats(ranks: list[dict], partition: Partition, sharing: SharingConfig, parallel: ParallelConfig,
               wall_s: float, plan_seconds: float) -> dict[str, Any]:
    """The job's statistics over its engines' (`ranks`), with the keys one engine's have (`LLM._statistics`): counts
    and the KV pool summed over the engines (the job's pool; a script reading `kv_blocks` got a KeyError only under
    data parallelism), the largest sharing degree, and each rank's own in `ranks`."""
    sums = {k: sum(r.get(k) or 0 for r in ranks) for k in (
        "num_requests", "num_completions", "prompt_tokens", "completion_prompt_tokens", "output_tokens",
        "prefill_tokens_computed", "recomputed_tokens", "kept_prefill_tokens", "decode_tokens", "attended_keys",
        "num_block_copies", "num_prefix_releases", "num_groups", "planned_prefill_tokens", "kv_blocks", "kv_tokens",
        "kv_cache_gib", "num_preemptions")}
    reserves = [r["activation_reserve_gib"] for r in ranks if r.get("activation_reserve_gib") is not None]
    units = sum(r["num_completions"] / r["mean_sharing_degree"] for r in ranks if r.get("mean_sharing_degree"))
    # (as LLM's: the saving is against the completions' prompt tokens, the prefill without sharing, and leaves out
    # what preemption computed again)
    prompt_tokens = sums["completion_prompt_tokens"]
    prefill = sums["prefill_tokens_computed"] - sums["recomputed_tokens"]
    finish = [r["finish_s"] for r in ranks if r.get("num_requests")]  # (a rank given nothing balances nothing)
    steps = sum(r["num_steps"] for r in ranks)
    scheduled = sum(r.get("mean_tokens_per_step", 0.0) * r["num_steps"] for r in ranks)  # (a rank's job may be empty)
    keys = ("rank", "num_requests", "prompt_tokens", "prefill_tokens_computed", "output_tokens", "num_steps",
            "wall_s", "finish_s", "kv_blocks", "kv_tokens", "kv_cache_gib", "activation_reserve_gib", "ready_s",
            "import_s", "build_s", "build_phases", "torch_threads", "device")
    return {
        **sums, "saving_ratio": 1.0 - prefill / prompt_tokens if prompt_tokens else 0.0,
        "mean_sharing_degree": sums["num_completions"] / units if units else 0.0,
        "max_sharing_degree": max((r.get("max_sharing_degree") or 0 for r in ranks), default=0),
        "activation_reserve_gib": sum(reserves) if reserves else None,
        "num_steps": steps, "mean_tokens_per_step": scheduled / steps if steps else 0.0,
        "wall_s": wall_s,
        "output_tokens_per_s": sums["output_tokens"] / wall_s if wall_s > 0 else 0.0, "plan_seconds": plan_seconds,
        **dataclasses.asdict(sharing),
        "data_parallel_size": parallel.data_parallel_size, "engines_per_gpu": parallel.engines_on_each_gpu,
        "num_engines": len(ranks),
        "kv_cache_dtype": next((r["kv_cache_dtype"] for r in ranks if r.get("kv_cache_dtype")), None),
        "finish_time_spread": (max(finish) - min(finish)) / max(finish) if finish and max(finish) > 0 else 0.0,
        "duplicated_prefill_tokens": partition.duplicated_prefill_tokens,
        "placed_on_held_tokens": partition.placed_on_held_tokens,
        "num_split_groups": partition.num_split_groups,
        "ranks": [{k: r.get(k) for k in keys} for r in ranks],
    }


SEED_STRIDE = 0x9E3779B97F4A7C15
"""The odd 64-bit constant (the golden ratio's) between two engines' seeds (`engine_seed`)."""


def engine_seed(seed: int, engine: int) -> int:
    """Engine `engine`'s seed of the generator its unseeded requests draw from: the job's for engine 0 (one engine
    samples as it always did), another for each other engine. With the job's seed on every engine, row k of each
    engine's step drew the same noise, so identical unseeded prompts spread over two engines came back as pairs of
    identical samples (8 distinct of 16), and `run` starts two engines per GPU on its own for a small model.
    Seeded requests are untouched: their noise comes from their own seed."""
    return seed if engine == 0 else (seed + engine * SEED_STRIDE) % (1 << 64)


def rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """Rank `rank`'s engine config from the job's (its seed: `engine_seed`): rank r runs on GPU group
    r // engines_per_gpu (its first GPU: group x tensor_parallel_size GPUs past the configured device). Engines
    sharing a GPU whose KV size is automatic each get an equal part of gpu_memory_utilization (`engine_share`)
    and count only their own memory against it (`gpu_memory_accounting="engine"`), so they can size their caches at
    once; a given KV size is each engine's. Resolves the device, so it runs in the worker (the parent imports no
    torch)."""
    from batchllm.engine import check_gpu_count, resolve_device
    from batchllm.parallel.tp_worker import rank_device
    from batchllm.runner.model_runner import engine_share

    par, cache = config.parallel, config.cache
    engines, tp = par.engines_on_each_gpu, par.tensor_parallel_size
    device = resolve_device(config.model.device)
    check_gpu_count(par, device)
    if device.type == "cuda" and engines > 1 and cache.sized_from_memory:
        cache = dataclasses.replace(cache, gpu_memory_accounting="engine",
                                    gpu_memory_utilization=engine_share(cache.gpu_memory_utilization, engines))
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, device=str(rank_device(device, rank // engines * tp)),
                                  seed=engine_seed(config.model.seed, rank)),
        cache=cache,
        parallel=dataclasses.replace(par, data_parallel_size=1, engines_per_gpu=1),
    )


SMALL_MODEL_PARAMETERS = 550_000_000
"""Below this many parameters `auto_engines_per_gpu` runs two engines per GPU. On an H200 (dummy
weights; docs/benchmarks.md, sessions 20-21), against one engine:
  - SmolLM2-135M, 6,000 chat-like requests: the GPU idles 72-75% (the host schedules each step), two
    engines 1.71-2.22x;
  - SmolLM2-360M and Qwen2.5-0.5B shapes, the same requests: 1.23-1.90x and 2.06-2.18x; Qwen2.5-0.5B
    decode-heavy (512 requests, GPU idle 45%): 1.17-1.26x;
  - Llama-3.2-1B: chat-like 1.42-1.59x, but decode-heavy, where one engine keeps the GPU busy (4%
    idle), 0.71x.
So the line is drawn just above the largest shape measured to gain on every workload (0.49B), short
of 0.6B models such as Qwen3-0.6B (0.596B, heavier per token, not measured)."""


def auto_engines_per_gpu(config: EngineConfig, num_parameters: int, cuda_devices: Callable[[], int],
                         cpu_cores: int) -> int:
    """What `batchllm run` takes for engines_per_gpu when it is not set: 2 for a small model (under
    SMALL_MODEL_PARAMETERS) on one CUDA GPU with 4 or more CPU cores (each engine's host work needs
    a core of its own), else 1. Also 1 wherever the user's other options would change meaning:
    data or tensor parallelism, a KV size given (it would be each engine's), or a
    gpu_memory_utilization whose half leaves no more than the activation reserve. `cuda_devices` is
    asked last: it initializes the CUDA driver."""
    mc, par, cache = config.model, config.parallel, config.cache
    wanted = (num_parameters < SMALL_MODEL_PARAMETERS and mc.device != "cpu" and cpu_cores >= 4
              and par.data_parallel_size == 1 and par.tensor_parallel_size == 1
              and cache.sized_from_memory and leaves_activation_reserve(cache.gpu_memory_utilization, 2))
    return 2 if wanted and cuda_devices() > 0 else 1


def cuda_driver():
    """The CUDA driver library, initialized (no context is made), or None where there is none."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    return driver if driver.cuInit(0) == 0 else None


def cuda_device_count() -> int:
    """CUDA devices the driver shows this process (CUDA_VISIBLE_DEVICES applies), found without
    importing torch (`batchllm run` decides its engine processes before loading anything heavy);
    0 without a driver."""
    driver = cuda_driver()
    count = ctypes.c_int(0)
    if driver is None or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_total_memory(ordinal: int) -> int | None:
    """Bytes of memory on CUDA device `ordinal` (numbered as this process sees them), asked of the
    driver: torch's `get_device_properties` would initialize torch's CUDA state in the caller, which in
    `batchllm run`'s data-parallel parent runs no kernel. None where the driver cannot say."""
    driver = cuda_driver()
    device, total = ctypes.c_int(0), ctypes.c_size_t(0)
    if (driver is None or driver.cuDeviceGet(ctypes.byref(device), ordinal) != 0
            or driver.cuDeviceTotalMem_v2(ctypes.byref(total), device) != 0):
        return None
    return total.value


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def engine_threads(processes: int, available: int, environ=os.environ) -> int | None:
    """torch's CPU threads for one of `processes` engine processes sharing `available` threads (a
    host's `usable_cores`, or one data-parallel rank's share of them, which its tensor-parallel ranks
    split again): an equal share, at least one, on CPU and on CUDA alike (a CUDA engine's host work
    uses few threads, and a thread per core in every process only contends); None where the user
    chose with OMP_NUM_THREADS (torch took it already)."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, available // processes)


# ---------------------------------------------------------------------------------------- worker side
def die_with_parent() -> None:
    """This spawned process ends (`os._exit`) when its parent process ends, so a killed job leaves no rank behind: a
    daemon thread waits on the parent's sentinel, which closes when the parent *process* exits, as vLLM's workers
    watch a death pipe; a parent already gone ends this process at once. (Linux's PR_SET_PDEATHSIG, used before,
    fires when the *thread* that started the process ends: an LLM built in a thread that then ended, a thread
    pool's, lost its workers to SIGKILL.)"""
    parent = mp.parent_process()
    if parent is None:
        return
    if not parent.is_alive():
        os._exit(1)
    threading.Thread(target=_exit_when_gone, args=(parent.sentinel,), name="batchllm-parent-watch",
                     daemon=True).start()


def _exit_when_gone(parent_sentinel) -> None:
    mp_connection.wait([parent_sentinel])  # (readable only once the parent process has exited)
    os._exit(1)


def _worker_main(rank: int, size: int, config: EngineConfig, conn) -> None:
    """Build rank `rank`'s engine and serve the parent's jobs. Ctrl-C in a terminal reaches every process of
    the job: a worker leaves it to the parent, which aborts its job or stops it (a second Ctrl-C, arriving
    while a worker shut down, printed its traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()  # first: importing torch takes seconds, and a parent killed meanwhile would leave this running
    started = time.perf_counter()
    try:
        import torch

        if config.parallel.tensor_parallel_size > 1:
            # this worker leads a tensor-parallel group, whose followers are its children: a daemonic
            # process may not start any. The parent still sees it as a daemon (and stops it at exit); the
            # followers die with it (die_with_parent) or are stopped by its engine's shutdown.
            mp.current_process().daemon = False
        from batchllm.llm import LLM

        threads = engine_threads(size, usable_cores())  # (this rank's share: its TP ranks split it again)
        if threads is not None:
            torch.set_num_threads(threads)
        own = rank_config(config, rank)  # (resolves the device: "auto" is the CPU where CUDA is not)
        imported = time.perf_counter()
        llm = LLM.from_config(own)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which names the rank
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    engine = llm.engine
    device = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else str(engine.device)
    conn.send(("ready", {"import_s": imported - started, "build_s": time.perf_counter() - imported,
                         "build_phases": engine.build_seconds, "torch_threads": torch.get_num_threads(),
                         "kv_tokens": llm.kv_cache_tokens, "kv_block_size": llm.engine.core.scheduler.kv.block_size,
                         "device": device,
                         "dtype": str(engine.dtype).removeprefix("torch.")}))
    serve_jobs(llm, conn)


def serve_jobs(llm, conn) -> None:
    """A ready worker's loop: run each job the parent sends until it sends None or goes away; the
    LLM is shut down at the end. llm: anything with `iter_generate(prompts, params, use_tqdm,
    refill)`, `last_stats` and `shutdown()` (the benchmark passes one without a model)."""
    try:
        while (task := conn.recv()) is not None:
            if task[0] == "abort":
                continue  # (of a job that had ended here before the parent stopped it)
            if task[0] == "reset_prefix_cache":
                llm.reset_prefix_cache()
                continue
            _, job, items = task
            conn.send(("done", job, _run_job(llm, job, items, conn)))
    except EOFError:
        pass  # the parent went away
    except WorkerDied as e:  # (this worker's tensor-parallel rank, named)
        conn.send(("error", str(e)))
    except BaseException:  # noqa: BLE001
        conn.send(("error", traceback.format_exc(limit=8)))
    finally:
        llm.shutdown()


def describe_start(times: dict[str, Any]) -> str:
    """One worker's `DataParallelEngine.start_times` entry as text, seconds to a tenth (the key names carry
    the units; the build's phases are seconds): "ready_s 4.2, import_s 1.1, build_s 2.9 (model 0.4, kv_cache
    0.1, ...), torch_threads 8"."""
    def value(v) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    phases = times.get("build_phases") or {}
    described = (f"{k} {value(v)}" + (f" ({', '.join(f'{p} {t:.1f}' for p, t in phases.items())})"
                                      if k == "build_s" and phases else "")
                 for k, v in times.items() if isinstance(v, (int, float)))  # (not the phases, device, dtype)
    return ", ".join(described)


def _run_job(llm, job: int, items: list, conn) -> dict:
    """Run the pinned items, pulling tail shards from the parent whenever everything held has been
    admitted; each finished prompt goes back at once. The parent's ("abort", job) (its only message during a
    job, but a shard answering a pull) stops it before the next step: what still runs is aborted."""
    from batchllm.inputs import TokenizedPrompt

    index_of: list[int] = []
    aborted = False

    def unpack(packed: PackedItems) -> tuple[list, list]:
        batch = packed.unpack()
        index_of.extend(i for i, _, _ in batch)
        return [TokenizedPrompt(ids, None) for _, ids, _ in batch], [sp for _, _, sp in batch]

    def pull() -> tuple[list, list] | None:
        nonlocal aborted
        conn.send(("pull", job))
        message = conn.recv()
        while message[0] == "abort" and message[1] != job:  # (an abort of an earlier job, which ended here)
            message = conn.recv()
        aborted = aborted or message[0] == "abort"
        if not aborted and message[0] != "shard":
            raise RuntimeError(f"data-parallel worker: expected a shard of job {job}, got {message[0]!r}")
        return None if aborted or message[2] is None else unpack(message[2])

    def stop_asked() -> bool:
        """Before every step: the parent's abort of this job, read only when one waits. Only an abort comes
        during a job (the parent sends the next job after aborting this one), and the pipe is read no further."""
        nonlocal aborted
        if not aborted and conn.poll():
            message = conn.recv()
            if message[0] != "abort":
                raise RuntimeError(f"data-parallel worker: expected an abort of job {job}, got {message[0]!r}")
            aborted = message[1] == job
        return aborted

    first = unpack(items) if len(items) else pull()
    if first is None:  # (its engine is built all the same: its cache is reported as a working rank's)
        from batchllm.llm import kv_pool_stats

        return {"num_requests": 0, "prompt_tokens": 0, "prefill_tokens_computed": 0, "output_tokens": 0,
                "num_steps": 0, "wall_s": 0.0, **kv_pool_stats(llm.engine.kv_spec)}
    for local, output in llm.iter_generate(*first, use_tqdm=False, refill=pull, stop_asked=stop_asked):
        output.prompt = output.prompt_token_ids = None  # the parent has them: it puts them back
        conn.send(("result", job, [(index_of[local], output)]))
    return dict(llm.last_stats)
