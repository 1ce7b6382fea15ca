"""Tensor parallelism on CPU (gloo ranks in follower processes): the same greedy tokens as one
process, and the same logprobs and prompt logprobs (shared prefix included) within float32 rounding."""

import pytest

from batchllm import LLM, SamplingParams
from batchllm.models.spec import ModelLoadError
from tests.helpers import with_kv_scales

pytestmark = pytest.mark.slow

PROMPTS = [[1, 5, 9, 300, 77, 12], [1, 5, 9, 300, 80], [4000, 12, 9], [1, 5, 9, 300, 77, 12, 13, 14, 15]]


def _run(model_dir, tp, **kw):
    llm = LLM(model_dir, dtype="float32", device="cpu", tensor_parallel_size=tp, max_model_len=256, **kw)
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5, prompt_logprobs=3)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs + o.prompt_logprobs[1:]) for o in outs]
    finally:
        llm.shutdown()


def _assert_same(a, b, tol):
    for (tokens_a, lp_a), (tokens_b, lp_b) in zip(a, b):
        assert tokens_a == tokens_b
        for step_a, step_b in zip(lp_a, lp_b):
            assert step_a.keys() == step_b.keys()
            for token in step_a:
                assert abs(step_a[token].logprob - step_b[token].logprob) < tol


@pytest.mark.parametrize("name", ["llama", "qwen2-untied"])
def test_two_ranks_match_one_process(tiny_model_factory, name):
    model_dir = tiny_model_factory(name)
    _assert_same(_run(model_dir, 1), _run(model_dir, 2), 1e-4)


def test_three_ranks_on_smollm2(default_model_dir):
    # 9 query heads and 3 KV heads: 3 ranks hold 3 and 1 each; the vocabulary splits in three
    _assert_same(_run(str(default_model_dir), 1), _run(str(default_model_dir), 3), 1e-3)


def test_kv_heads_fewer_than_the_ranks_are_replicated(tiny_model_factory):
    """tensor_parallel_size above num_key_value_heads was refused (a 2-KV-head model could not run on 4 GPUs);
    vLLM replicates the KV heads, each rank holding the one its query heads read, and so does this engine: the
    tokens and logprobs of one process. 4 ranks over 2 KV heads: each KV head on two ranks."""
    model_dir = tiny_model_factory("llama")  # (4 query heads, 2 KV heads)
    _assert_same(_run(model_dir, 1), _run(model_dir, 4), 1e-4)


def test_sizes_that_do_not_divide_are_named(tiny_model_factory):
    import dataclasses
    from pathlib import Path

    from batchllm.models.spec import read_model_spec
    from batchllm.parallel.tensor_parallel import shard_spec

    with pytest.raises(ModelLoadError, match="does not divide the model's num_attention_heads"):
        LLM(tiny_model_factory("llama"), dtype="float32", device="cpu", tensor_parallel_size=3)
    spec = dataclasses.replace(read_model_spec(Path(tiny_model_factory("llama"))), num_heads=24, num_kv_heads=4)
    assert (shard_spec(spec, 8).num_heads, shard_spec(spec, 8).num_kv_heads) == (3, 1)  # (each KV head on 2 ranks)
    with pytest.raises(ModelLoadError, match="does not divide the model's num_key_value_heads \\(4\\); choose a size "
                                             "that divides 24 query heads and intermediate size 128, and divides or "
                                             "is a multiple of its 4 KV heads"):
        shard_spec(spec, 6)


def test_fp8_kv_cache_with_checkpoint_scales_over_two_ranks(tiny_model_factory, tmp_path):
    """Each rank's cache holds its KV heads in fp8; the per-layer scales (the checkpoint's, replicated)
    are the same on every rank: two ranks give one process's tokens. The checkpoint's quantization_config is FP8
    with every linear layer ignored: its scales load (as in vLLM, only an FP8 model loads them) while the weights
    stay float32, whose products do not depend on the split (FP8 activations would be quantized per shard)."""
    import shutil

    model_dir = tmp_path / "scaled"
    shutil.copytree(tiny_model_factory("llama"), model_dir)
    with_kv_scales(model_dir, 0.5, 2.0)
    llm = LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_dtype="fp8", max_model_len=256)
    assert llm.engine.model.kv_scales[:, :2].tolist() == [[0.5, 2.0], [0.5, 2.0]], "the checkpoint's scales load"
    llm.shutdown()
    one, two = (_run(str(model_dir), tp, kv_cache_dtype="fp8") for tp in (1, 2))
    _assert_same(one, two, 1e-3)


def test_ranks_split_the_leaders_threads_and_give_them_back(tiny_model_factory, monkeypatch):
    """Rank 0 and its followers each take an equal share of rank 0's torch threads while the engine
    lives (`data_parallel.engine_threads`); shutting it down gives rank 0 its own back."""
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(4)  # (a share to take on any machine)
    try:
        llm = LLM(tiny_model_factory("llama"), dtype="float32", device="cpu", tensor_parallel_size=2,
                  max_model_len=256)
        try:
            assert torch.get_num_threads() == 2
        finally:
            llm.shutdown()
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("where, error", [("build_runner", RuntimeError), ("KVCacheManager", KeyboardInterrupt)])
def test_a_failed_build_stops_the_followers_and_gives_the_threads_back(tiny_model_factory, monkeypatch, where, error):
    """Rank 0 failing after its followers started (out of memory, a bad checkpoint; or Ctrl-C once its runner was
    built, which left the followers and the process group alive with no LLM to shut them down: every later
    tensor-parallel LLM in the process was refused): the followers are stopped, not left waiting, rank 0 has its
    threads again, and the next tensor-parallel LLM builds."""
    import torch

    from batchllm import engine

    def fail(*args, **kwargs):
        raise error("rank 0 could not build")

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(engine, where, fail)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    model = tiny_model_factory("llama")
    try:
        with pytest.raises(error, match="rank 0 could not build"):
            LLM(model, dtype="float32", device="cpu", tensor_parallel_size=2, max_model_len=256)
        assert torch.get_num_threads() == 4
        import multiprocessing

        assert not [p for p in multiprocessing.active_children() if p.name.startswith("batchllm-tp")]
        monkeypatch.undo()
        llm = LLM(model, dtype="float32", device="cpu", tensor_parallel_size=2, max_model_len=256)
        llm.shutdown()
    finally:
        torch.set_num_threads(before)


def _say_started_then_end(conn) -> None:
    """A follower that reports it runs, then ends before it is ready to join (its device refused, say)."""
    import os

    conn.send("started")
    os._exit(3)


def test_a_follower_that_ends_before_it_joins_is_named_not_waited_for():
    """A follower that said it started, then failed before joining the group (importing the engine, taking its
    device), left rank 0 at the group's rendezvous until the collective timeout (30 min), then "1/2 clients
    joined". Rank 0 now waits for each follower to be ready to join, and names one that ended first."""
    import multiprocessing

    from batchllm.parallel.tp_worker import wait_until_started

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_say_started_then_end, args=(theirs,))
    process.start()
    theirs.close()
    with pytest.raises(RuntimeError, match="tensor-parallel rank 1 exited with status 3 before it joined the group"):
        wait_until_started([process], [ours], timeout_s=120)


def _say_started_then_wait(conn) -> None:
    import time

    conn.send("started")
    time.sleep(60)


def test_a_follower_slow_to_get_ready_is_named_as_such():
    """The wait now runs up to the follower's readiness (its engine imported, its device taken): one that started
    but is not ready in time was said not to have started."""
    import multiprocessing

    from batchllm.parallel.tp_worker import wait_until_started

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_say_started_then_wait, args=(theirs,))
    process.start()
    theirs.close()
    try:
        with pytest.raises(RuntimeError, match=r"tensor-parallel ranks \[1\] did not get ready to join the group"):
            wait_until_started([process], [ours], timeout_s=15)  # (a spawned start takes seconds on a busy box)
    finally:
        process.kill()
        process.join(10)


def test_a_follower_that_dies_while_the_engine_is_built_is_named(tiny_model_factory, monkeypatch):
    """A follower dying after it joined, while the engine was built, surfaced as rank 0's bare gloo error
    ("Connection reset by peer ... GLHF"); it is a WorkerDied naming the rank and how it ended, as during a step."""
    import multiprocessing

    from batchllm import engine
    from batchllm.parallel.data_parallel import WorkerDied

    def follower_dies(*args, **kwargs):
        for p in multiprocessing.active_children():
            if p.name.startswith("batchllm-tp"):
                p.kill()
                p.join(10)
        raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")

    monkeypatch.setattr(engine, "build_runner", follower_dies)
    with pytest.raises(WorkerDied, match="tensor-parallel rank 1 killed by SIGKILL while the engine was built "
                                         r"\(RuntimeError: \[gloo"):
        LLM(tiny_model_factory("llama"), dtype="float32", device="cpu", tensor_parallel_size=2, max_model_len=256)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("batchllm-tp")]


def test_data_parallel_engines_of_two_ranks_each(tiny_model_factory):
    """tensor_parallel_size with data_parallel_size: each data-parallel worker leads its own group (its
    followers are its children, which a daemonic worker could not start); the tokens are one process's."""
    model_dir = tiny_model_factory("llama")
    one = LLM(model_dir, dtype="float32", device="cpu", max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    try:
        expected = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    finally:
        one.shutdown()
    llm = LLM(model_dir, dtype="float32", device="cpu", max_model_len=256, tensor_parallel_size=2,
              data_parallel_size=2)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
        assert llm.last_stats["num_engines"] == 2
    finally:
        llm.shutdown()


@pytest.mark.parametrize("option", ["tensor_parallel_size", "data_parallel_size"])
def test_a_script_without_a_main_guard_fails_by_name(tiny_model_factory, tmp_path, option):
    """Spawned ranks import the script again, whose top level then creates an LLM there and dies: the
    job ends with an error that names the missing guard (tensor parallelism used to wait forever for them)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text("from batchllm import LLM\n"
                      f"LLM({tiny_model_factory('llama')!r}, dtype='float32', device='cpu', {option}=2)\n"
                      "print('built')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1 and "built" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert "status 1" in last and 'if __name__ == "__main__":' in last, last


def _run_script(tmp_path, body: str, timeout_s: float = 120):
    """Run `body` (under the main guard, with LLM, SamplingParams, signal and PROMPTS at hand) in its own
    interpreter: a hang fails the test at `timeout_s` and its ranks end with it (they die with their parent)."""
    import os
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "script.py"
    script.write_text("import signal\nfrom batchllm import LLM, SamplingParams\n"
                      "from batchllm.runner import model_runner\n"
                      f"PROMPTS = {PROMPTS!r}\nif __name__ == '__main__':\n"
                      # (Python started with SIGINT ignored, as under a CI runner in the background, installs no
                      # KeyboardInterrupt handler: the script's interrupts need it)
                      "    signal.signal(signal.SIGINT, signal.default_int_handler)\n" + textwrap.indent(body, "    "))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout_s,
                              env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the script hung (killed after {timeout_s:.0f} s); its output: {e.stdout!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


_CUT_AT_STEP_3 = """
llm = LLM({model!r}, dtype="float32", device="cpu", tensor_parallel_size=2, max_model_len=256, max_num_seqs=2)
params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
prompts = [{{"prompt_token_ids": p}} for p in PROMPTS]
expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
forward, steps = model_runner.ModelRunner._forward_and_sample, []

def cut(self, *args):  # rank 0 only: after the step went to the followers, before its collectives
    steps.append(1)
    if len(steps) == 3:
        {cut}
    return forward(self, *args)

model_runner.ModelRunner._forward_and_sample = cut
try:
    llm.generate(prompts, params, use_tqdm=False)
except BaseException as e:
    print("stopped:", type(e).__name__, e)
model_runner.ModelRunner._forward_and_sample = forward
try:
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    print("next call:", "the same tokens" if again == expected else f"other tokens {{again}} {{expected}}")
except RuntimeError as e:
    print("next call refused:", e)
import multiprocessing
print("followers alive:", len([p for p in multiprocessing.active_children() if p.name.startswith("batchllm-tp")]))
llm.shutdown()
print("shut down")
"""


def test_an_interrupted_generate_leaves_the_next_call_working(tiny_model_factory, tmp_path):
    """Ctrl-C (Jupyter's "interrupt kernel") arriving while rank 0 is between a step's collectives: the interrupt
    waits for the step's end, so the followers are not left inside it and the next call runs (it used to hang in
    the step message's broadcast for gloo's 30 minutes)."""
    out = _run_script(tmp_path, _CUT_AT_STEP_3.format(model=tiny_model_factory("llama"),
                                                      cut="signal.raise_signal(signal.SIGINT)"))
    assert out == ["stopped: KeyboardInterrupt ", "next call: the same tokens", "followers alive: 1", "shut down"]


@pytest.mark.parametrize("cut", ["raise RuntimeError('rank 0 failed mid-step')",
                                 "signal.raise_signal(signal.SIGINT); signal.raise_signal(signal.SIGINT)"])
def test_a_step_cut_short_refuses_the_next_call_by_name(tiny_model_factory, tmp_path, cut):
    """An error on rank 0 part-way through a step, or a second Ctrl-C while the first waits for the step's end:
    the followers are out of step, so they are stopped at once and the next call says the LLM must be rebuilt
    instead of hanging in a collective."""
    out = _run_script(tmp_path, _CUT_AT_STEP_3.format(model=tiny_model_factory("llama"), cut=cut))
    assert out[0] in ("stopped: RuntimeError rank 0 failed mid-step", "stopped: KeyboardInterrupt ")
    assert out[1].startswith("next call refused:") and "build a new LLM" in out[1], out
    assert out[2:] == ["followers alive: 0", "shut down"]


def _followers():
    import multiprocessing

    return [p for p in multiprocessing.active_children() if p.name.startswith("batchllm-tp")]


@pytest.mark.timeout(300)
def test_a_second_engine_is_refused_and_leaves_the_first_working(tiny_model_factory):
    """One tensor-parallel engine per process: a second is refused before it starts any rank, and the first keeps
    its group (the refusal used to tear it down: its next call failed with 'Group ... is not registered')."""
    model_dir = tiny_model_factory("llama")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    first = LLM(model_dir, dtype="float32", device="cpu", tensor_parallel_size=2, max_model_len=256)
    try:
        expected = [o.outputs[0].token_ids for o in first.generate(prompts, params, use_tqdm=False)]
        with pytest.raises(RuntimeError, match="a tensor-parallel engine is already running in this process"):
            LLM(model_dir, dtype="float32", device="cpu", tensor_parallel_size=2, max_model_len=256)
        assert len(_followers()) == 1
        assert [o.outputs[0].token_ids for o in first.generate(prompts, params, use_tqdm=False)] == expected
    finally:
        first.shutdown()


@pytest.mark.timeout(300)
def test_a_process_group_of_the_callers_is_named_and_kept(tiny_model_factory):
    """The caller's own torch.distributed group: tensor parallelism is refused, saying that group is in the way
    (not 'another engine'), and the group is left as it was (it used to be destroyed)."""
    import torch.distributed as dist

    from batchllm.parallel.tp_worker import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="made outside batchllm"):
            LLM(tiny_model_factory("llama"), dtype="float32", device="cpu", tensor_parallel_size=2, max_model_len=256)
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert not _followers()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_followers_wait_for_the_next_step_longer_than_a_collective_may_take(tiny_model_factory, monkeypatch):
    """The followers wait for rank 0's next step in a gloo group of their own (`STEP_WAIT_TIMEOUT_S`, a week): in the
    one group, an LLM left idle past the collectives' timeout (30 minutes: a notebook left alone) lost its followers
    ("Timed out waiting ... for recv operation") and its next call failed. Here the collectives' timeout is 8 s and the
    LLM idles 12 s between two calls."""
    import time

    monkeypatch.setenv("BATCHLLM_TP_COLLECTIVE_TIMEOUT_S", "8")  # (the followers, spawned, read it too)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8] * 4 + [20 + i]} for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = LLM(tiny_model_factory("llama"), dtype="float32", device="cpu", tensor_parallel_size=2, max_model_len=256)
    try:
        first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        time.sleep(12)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == first
    finally:
        llm.shutdown()


def test_a_bad_collective_timeout_is_named_before_any_follower_starts(tiny_model_factory, monkeypatch):
    import multiprocessing

    from batchllm.parallel.tensor_parallel import collective_timeout_s

    for bad in ("30m", "nan", "0", "-5", "1e12"):
        monkeypatch.setenv("BATCHLLM_TP_COLLECTIVE_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match=f"BATCHLLM_TP_COLLECTIVE_TIMEOUT_S must be .* got '{bad}'"):
            collective_timeout_s()
    with pytest.raises(ValueError, match="BATCHLLM_TP_COLLECTIVE_TIMEOUT_S"):
        LLM(tiny_model_factory("llama"), dtype="float32", device="cpu", tensor_parallel_size=2, max_model_len=256)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("batchllm-tp")]
    monkeypatch.setenv("BATCHLLM_TP_COLLECTIVE_TIMEOUT_S", "90.5")
    assert collective_timeout_s() == 90.5
