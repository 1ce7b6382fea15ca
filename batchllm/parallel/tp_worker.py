"""Tensor-parallel process layout: rank 0 is the engine's own process; ranks 1..size-1 are follower
processes it starts, each building the same runner over its shard and running rank 0's steps.

Devices: a TP group whose rank 0 is on cuda:B uses cuda:B .. cuda:B+size-1; on CPU every rank uses
the CPU (gloo). Followers die with their parent (PR_SET_PDEATHSIG on Linux) and are stopped by
`TensorParallelFollowers.stop`, so no rank outlives the job.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing import connection as mp_connection

import torch

from batchllm.parallel.data_parallel import NOT_STARTED_HINT, _exit_description, die_with_parent

logger = logging.getLogger(__name__)


def rank_device(base: torch.device, rank: int) -> torch.device:
    if base.type != "cuda":
        return base
    return torch.device("cuda", (base.index or 0) + rank)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TensorParallelFollowers:
    processes: list
    leader_threads: int | None = None
    """Rank 0's torch CPU threads before the group took its share (`stop` gives them back); None: unchanged."""

    def stop(self, runner, timeout_s: float = 60.0) -> None:
        """Tell the followers to leave their loops (through rank 0's channel), then join them; rank 0
        gets its threads back whatever happens on the way."""
        if not self.processes:
            self.give_back_threads()
            return
        if runner.step_cut_short:  # the followers may wait in a collective of that step: a stop would hang
            self.abandon()
            return
        from batchllm.parallel.tensor_parallel import destroy_tp_group

        try:
            try:
                runner.stop_followers()
            except Exception as e:  # noqa: BLE001 - a follower already gone (killed with the job): nothing to tell
                logger.warning("could not stop the tensor-parallel followers cleanly: %s", e)
            runner.release_graphs()
            if not destroy_tp_group():  # with the followers' own: NCCL's teardown waits for every rank's
                logger.warning("the tensor-parallel process group did not shut down in time; it is left open")
            for p in self.processes:
                p.join(timeout_s)
                if p.is_alive():
                    p.kill()
            self.processes = []
        finally:
            self.give_back_threads()

    def first_dead(self) -> str | None:
        """"rank R <how it ended>" for each follower that has ended, one killed by a signal first (its peers then
        fail their collectives and exit too), or None; waits up to a second for ranks still ending."""
        ended = []
        for rank, p in enumerate(self.processes, start=1):
            p.join(1.0 if not ended and rank == 1 else 0.2)
            if not p.is_alive():
                ended.append((p.exitcode is None or p.exitcode >= 0, rank, p.exitcode))
        return "; ".join(f"rank {rank} {_exit_description(code)}" for _, rank, code in sorted(ended)) or None

    def build_failure(self, error: BaseException) -> BaseException:
        """What a failure while the engine was built means: where rank 0's collective failed because a follower
        ended (a bare "Connection reset by peer"), a WorkerDied naming that rank and how it ended, as a step's
        failure names it (`Engine.step_failure`); otherwise the error itself (rank 0's own, which the followers,
        building the same, may share)."""
        if not _a_peers_transport_error(error) or (dead := self.first_dead()) is None:
            return error
        return follower_died(dead, "while the engine was built (", error)

    def abandon(self) -> None:
        """Rank 0 could not build its engine, or stopped part-way through a step: kill the followers (they
        cannot be told to stop), leave the group (only one `init_tp_group` made: `destroy_tp_group`) and give
        rank 0 its threads back."""
        from batchllm.parallel.tensor_parallel import destroy_tp_group

        try:
            for p in self.processes:
                p.kill()
                p.join(5)
            self.processes = []
            destroy_tp_group(wait_s=5.0)
        finally:
            self.give_back_threads()

    def give_back_threads(self) -> None:
        """Rank 0's torch threads as they were before the group took its share (once)."""
        if self.leader_threads is not None:
            torch.set_num_threads(self.leader_threads)
            self.leader_threads = None


def start_followers(config, facts) -> tuple[object, TensorParallelFollowers]:
    """Start ranks 1..size-1 and join the group as rank 0; returns (rank 0's TPGroup, the followers).
    config: the EngineConfig; facts: the `engine.ModelFacts` every rank builds from (picklable).
    Every rank takes an equal share of rank 0's torch CPU threads (`data_parallel.engine_threads`). Raises
    RuntimeError, having started nothing, where this process has a default process group already (another
    engine's or the caller's: `tensor_parallel.refuse_existing_group`)."""
    from batchllm.parallel.data_parallel import engine_threads
    from batchllm.parallel.tensor_parallel import collective_timeout_s, init_tp_group, refuse_existing_group

    refuse_existing_group()  # before anything starts: this process's group is another's (`abandon` leaves it)
    collective_timeout_s()  # (a bad BATCHLLM_TP_COLLECTIVE_TIMEOUT_S is named here, before any follower starts)
    size = config.parallel.tensor_parallel_size
    leader_threads = torch.get_num_threads()
    threads = engine_threads(size, leader_threads)
    if threads is not None:
        torch.set_num_threads(threads)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    processes, started = [], []
    for rank in range(1, size):
        ours, theirs = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_follower_main, args=(rank, size, init_method, config, facts, threads, theirs),
                        name=f"batchllm-tp{rank}", daemon=True)
        p.start()
        theirs.close()  # (the follower's end lives in the follower)
        processes.append(p)
        started.append(ours)
    followers = TensorParallelFollowers(processes, leader_threads if threads is not None else None)
    try:
        wait_until_started(processes, started)
        tp = init_tp_group(0, size, init_method, rank_device(facts.device, 0))
    except BaseException:
        followers.abandon()
        raise
    return tp, followers


STARTED, READY = "started", "ready"
"""What a follower reports on its pipe (`_follower_main`): it runs (its first act), then it is about to join the
group (its engine imported, its device and threads set)."""


def wait_until_started(processes: list, started: list, timeout_s: float = 600.0) -> None:
    """Return once every follower has said it is about to join the group (`READY`), so that rank 0 never
    waits at the group's rendezvous (up to the collective timeout, 30 min) for a rank that is gone; a follower
    that ends first raises RuntimeError naming it: before it said it runs (`STARTED`), as one does when the
    script's top level creates the LLM again in it, with the hint about the main guard; after, with its
    error (a device it could not take, say), which it printed."""
    waiting = {conn: (rank, p) for rank, (p, conn) in enumerate(zip(processes, started), start=1)}
    said = dict.fromkeys(waiting)
    deadline = time.monotonic() + timeout_s
    while waiting:
        if time.monotonic() > deadline:
            late = sorted(rank for conn, (rank, _) in waiting.items() if said[conn] is None)
            slow = sorted(rank for conn, (rank, _) in waiting.items() if said[conn] is not None)
            raise RuntimeError(f"tensor-parallel ranks {late + slow} did not "
                               + ("start" if not slow else "get ready to join the group (importing the engine, "
                                  "taking their devices)" if not late else "start or get ready to join the group")
                               + f" within {timeout_s:.0f} s")
        ready = mp_connection.wait([*waiting, *(p.sentinel for _, p in waiting.values())], 1.0)
        for conn, (rank, p) in list(waiting.items()):
            if conn.poll():
                try:
                    said[conn] = conn.recv()
                    if said[conn] == READY:
                        conn.close()
                        del waiting[conn]
                    continue
                except (EOFError, OSError):  # its end closed unsent: it ended
                    pass
            elif p.sentinel not in ready:
                continue
            p.join(5)
            if said[conn] is None:
                raise RuntimeError(f"tensor-parallel rank {rank} {_exit_description(p.exitcode)} before it "
                                   f"started: {NOT_STARTED_HINT}")
            raise RuntimeError(f"tensor-parallel rank {rank} {_exit_description(p.exitcode)} before it joined the "
                               "group (its error is above)")


def _follower_main(rank: int, size: int, init_method: str, config, facts, threads: int | None, started) -> None:
    """Rank `rank` of a tensor-parallel group: build the runner over its shard and run rank 0's steps
    until told to stop; `threads`: its torch CPU threads (None: torch's own count); `started`: a pipe end
    it reports its start on (`wait_until_started`). Ctrl-C in a terminal reaches every process of the job:
    a follower leaves it to rank 0, which stops or kills it."""
    die_with_parent()
    started.send(STARTED)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from batchllm.engine import build_runner
    from batchllm.parallel.tensor_parallel import destroy_tp_group, init_tp_group

    device = rank_device(facts.device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    started.send(READY)
    started.close()
    tp = init_tp_group(rank, size, init_method, device)
    code, runner = 1, None
    try:
        runner = build_runner(config, dataclasses.replace(facts, device=device), tp)
        runner.follow()
        destroy_tp_group()
        code = 0
    except BaseException as e:  # noqa: BLE001 - printed here: os._exit below skips the interpreter's report
        if runner is None or not _a_peers_transport_error(e):
            traceback.print_exc()
        else:  # a peer gone mid-step (rank 0 names which): one line, not a collective's traceback
            first = str(e).splitlines()[0][:200] if str(e) else ""
            print(f"batchllm: tensor-parallel rank {rank} stopped: {type(e).__name__}: {first}", file=sys.stderr)
    finally:
        os._exit(code)  # no interpreter teardown: a process group left open cannot hang it


def follower_died(dead: str, opening: str, error: BaseException):
    """The WorkerDied naming the followers that ended (`first_dead`) and the error rank 0 met by its type and first
    line, after `opening`: the words saying when rank 0 found it, through the parenthesis that holds that error."""
    from batchllm.parallel.data_parallel import WorkerDied

    first = str(error).splitlines()[0][:120] if str(error) else ""
    return WorkerDied(f"tensor-parallel {dead} {opening}{type(error).__name__}: {first})")


def _a_peers_transport_error(error: BaseException) -> bool:
    """A collective failed because another rank went away (gloo's or NCCL's connection errors)."""
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))
