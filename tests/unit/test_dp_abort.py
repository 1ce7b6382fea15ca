"""The data-parallel parent's count of the ranks that reported a job done, with stand-in workers (no model): a
"done" read is counted however its reader ends, so the next call never waits for one it already read."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from batchllm.inputs import TokenizedPrompt
from batchllm.options import engine_config
from batchllm.parallel.data_parallel import DataParallelEngine
from batchllm.request_output import CompletionOutput, RequestOutput
from batchllm.sampling_params import SamplingParams
from tests.helpers import within


def _output() -> RequestOutput:
    return RequestOutput("x", None, None, None, [CompletionOutput(0, "", [1], None, None, finish_reason="length")])


def stand_in_worker(rank, size, config, conn) -> None:
    """Job 1: rank 0 sends two results (the second after a pause) and waits for the abort; rank 1 reports done
    after a pause, so that its "done" is read in the same batch as rank 0's second result. Later jobs: every
    prompt's result at once, then done."""
    conn.send(("ready",))
    while (task := conn.recv()) is not None:
        if task[0] != "job":
            continue
        _, job, items = task
        batch = items.unpack()
        if job == 1 and rank == 0:
            conn.send(("result", job, [(batch[0][0], _output())]))
            time.sleep(0.3)
            conn.send(("result", job, [(batch[0][0], _output())]))
            while conn.recv() != ("abort", job):
                pass
        elif job == 1:
            time.sleep(0.3)
        else:
            conn.send(("result", job, [(i, _output()) for i, _, _ in batch]))
        conn.send(("done", job, {"num_requests": 0, "num_steps": 0}))


@pytest.mark.parametrize("stop", ["close", "interrupt"])
def test_a_done_read_with_the_result_the_caller_stopped_at_is_not_waited_for_again(stop):
    """A rank's "done", read in the same batch as the result at which the caller stopped reading (closed the call,
    or Ctrl-C in its loop), was never counted: the next call waited for it for ever before sending its job."""
    config = engine_config(device="cpu", data_parallel_size=2, max_model_len=64)
    prompts = [TokenizedPrompt([10 + i, 11, 12], None) for i in range(4)]
    params = [SamplingParams(max_tokens=2)] * 4
    with tempfile.TemporaryDirectory() as tmp:
        engine = DataParallelEngine(config, Path(tmp), 64, worker_main=stand_in_worker)
        try:
            engine.wait_ready()
            call = engine.generate(prompts, params, use_tqdm=False)
            next(call)
            time.sleep(1)  # (rank 0's second result and rank 1's done both wait in their pipes: read together)
            next(call)
            if stop == "close":
                call.close()
            else:
                with pytest.raises(KeyboardInterrupt):
                    call.throw(KeyboardInterrupt)
            got = within(20, lambda: list(engine.generate(prompts, params, use_tqdm=False)))  # (it waited for ever)
            assert sorted(i for i, _ in got) == [0, 1, 2, 3]
        finally:
            engine.shutdown()
