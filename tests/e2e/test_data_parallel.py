"""Data parallelism on CPU: two worker processes give the same greedy outputs as one engine; a
killed worker fails the job by name after the others' results came back; the CLI resumes."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.parallel.data_parallel import WorkerDied, engine_threads, usable_cores

pytestmark = pytest.mark.slow

SYSTEMS = ["You are a terse assistant.", "You answer in French.", "You are a pirate."]
QUESTIONS = ["What is 2+2?", "Name a colour.", "Say hi.", "What is the capital of Italy?"]


def _chats():
    return [[{"role": "system", "content": s}, {"role": "user", "content": q}] for s in SYSTEMS for q in QUESTIONS]


def test_two_workers_match_one_engine(default_llm, default_model_dir):
    params = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=1)
    one_engine = default_llm.chat(_chats(), params, use_tqdm=False)
    expected = [o.outputs[0].token_ids for o in one_engine]
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu", max_model_len=2048, data_parallel_size=2)
    try:
        outs = llm.chat(_chats(), params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        for o, e in zip(outs, one_engine):  # prompt logprobs come back from the workers (a split group too)
            assert len(o.prompt_logprobs) == len(e.prompt_logprobs) and o.prompt_logprobs[0] is None
            for a, b in zip(o.prompt_logprobs[1:], e.prompt_logprobs[1:]):
                assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
        stats = llm.last_stats
        assert stats["data_parallel_size"] == stats["num_engines"] == 2
        assert sum(r["num_requests"] for r in stats["ranks"]) == len(expected)
        assert all(r["num_requests"] > 0 for r in stats["ranks"])  # both ranks worked
        # the chat header all prompts share is one group, split over the two ranks: only it is computed
        # twice; each system prompt's own group stays on one rank
        assert stats["num_split_groups"] == 1 and 0 < stats["duplicated_prefill_tokens"] < 20
        # a second call reuses the same workers
        again = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        assert again[0].outputs[0].text == default_llm.generate(
            ["The capital of France is"], SamplingParams(temperature=0, max_tokens=4),
            use_tqdm=False)[0].outputs[0].text
    finally:
        llm.shutdown()


def test_two_engines_per_gpu_match_one_engine_and_report_their_start(tiny_model_factory):
    """engines_per_gpu runs its engines as data-parallel workers (here on the CPU's cores)."""
    model = tiny_model_factory("llama")
    prompts = [{"prompt_token_ids": [5, 6, 7, 8] * 8 + [20 + i] * (i + 1)} for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    options = dict(device="cpu", dtype="float32", skip_tokenizer_init=True)
    one = LLM(model, **options)
    try:
        expected = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
        one_engines_keys = set(one.last_stats)
    finally:
        one.shutdown()
    llm = LLM(model, engines_per_gpu=2, **options)
    try:
        assert llm.engine is None  # the engines run in the workers
        for p in llm._data_parallel.processes:  # Ctrl-C in a terminal reaches them too: they leave it to the parent
            os.kill(p.pid, signal.SIGINT)
        time.sleep(0.5)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
        ranks = llm.last_stats["ranks"]
        # the job's statistics have every key one engine's have (the pool's were only in `ranks`), summed
        assert one_engines_keys - set(llm.last_stats) == set()
        for key in ("kv_blocks", "kv_tokens", "num_requests"):
            assert llm.last_stats[key] == sum(r[key] for r in ranks) > 0, key
        assert (llm.last_stats["data_parallel_size"], llm.last_stats["engines_per_gpu"]) == (1, 2)
        assert llm.last_stats["num_engines"] == 2 and len(ranks) == 2
        # the job's tokens per step over both ranks' steps (bench's "tok/step" read 0.0 for data-parallel configs):
        # the prefill computed and every output token but each request's last (sampled, never fed back)
        scheduled = llm.last_stats["prefill_tokens_computed"] + llm.last_stats["output_tokens"] - len(prompts)
        assert llm.last_stats["mean_tokens_per_step"] * llm.last_stats["num_steps"] == pytest.approx(scheduled)
        # each engine takes its share of the cores for torch's threads (a user's OMP_NUM_THREADS stands)
        threads = engine_threads(2, usable_cores()) or torch.get_num_threads()
        for r in ranks:
            assert 0 < r["import_s"] + r["build_s"] < r["ready_s"]  # spawning and unpickling come first
            assert set(r["build_phases"]) >= {"model", "kv_cache"} and sum(r["build_phases"].values()) < r["build_s"]
            assert r["torch_threads"] == threads
        # one prompt: a rank gets nothing, and still reports its engine's cache (it reported kv_blocks and
        # kv_cache_gib null, and the job's kv_cache_dtype null where it was rank 0); the spread is the working ranks'
        assert [o.outputs[0].token_ids for o in llm.generate(prompts[:1], params, use_tqdm=False)] == expected[:1]
        stats = llm.last_stats
        assert sorted(r["num_requests"] for r in stats["ranks"]) == [0, 1] and stats["kv_cache_dtype"] == "float32"
        assert all(r["kv_blocks"] > 0 and r["kv_cache_gib"] > 0 for r in stats["ranks"]), stats["ranks"]
        assert stats["finish_time_spread"] == 0.0
        # each engine keeps its finished sequences' KV for the next call, and forgets it when reset, also when the
        # reset comes while a call is suspended (a worker in a job took the message for a protocol error and died)
        llm.generate(prompts, params, use_tqdm=False)
        assert llm.last_stats["kept_prefill_tokens"] > 0
        suspended = llm.iter_generate([llm.tokenize_prompt(p) for p in prompts], [params] * len(prompts),
                                      use_tqdm=False)
        next(suspended)
        llm.reset_prefix_cache()
        assert len(list(suspended)) == len(prompts) - 1
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
        assert llm.last_stats["kept_prefill_tokens"] == llm.last_stats["placed_on_held_tokens"] == 0
        # unseeded samples of one prompt over both engines: each engine draws its own noise (both drew the job
        # seed's, so the second engine's samples repeated the first's: 8 distinct of 16)
        same = [{"prompt_token_ids": [5, 6, 7, 8] * 8}] * 16
        samples = llm.generate(same, SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
        assert sorted(r["num_requests"] for r in llm.last_stats["ranks"]) == [8, 8]
        assert len({tuple(o.outputs[0].token_ids) for o in samples}) == 16
    finally:
        llm.shutdown()


def test_engines_with_dummy_weights_hold_one_model_whatever_seed_each_samples_with(tiny_model_factory):
    """Each engine's own sampling seed (`engine_seed`) also seeded its dummy weights: rank 1's overflowed the
    weights' generator ("Overflow when unpacking long long": data parallelism with load_format dummy, every
    benchmark's, could not start), and would have given each rank another model. Dummy weights are seeded by their
    names alone, as vLLM's by one fixed seed: two engines answer as one."""
    options = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, load_format="dummy")
    prompts = [{"prompt_token_ids": [5, 6, 7, 8 + i]} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    model = tiny_model_factory("llama")
    results = []
    for more in ({}, {"engines_per_gpu": 2}, {"seed": 5}):
        llm = LLM(model, **options, **more)
        try:
            results.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        finally:
            llm.shutdown()
    assert results[0] == results[1] == results[2]


def test_a_second_turn_goes_back_to_the_rank_that_kept_its_first(tiny_model_factory):
    """Each engine keeps the KV of the sequences it finished; the parent remembers which rank finished which and
    places a continued conversation there, so two engines take as many tokens from their caches as one engine
    does. Round two comes in the reverse order, so placed blind its groups would alternate onto the other rank."""
    model = tiny_model_factory("llama")
    rng = random.Random(0)
    heads = [[rng.randrange(100, 2000) for _ in range(70)] for _ in range(6)]
    first = [h + [rng.randrange(100, 2000) for _ in range(5)] for h in heads for _ in range(3)]
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)  # (75 + 8 written: a tail of 3 kept)

    def two_rounds(llm):
        answers = llm.generate([{"prompt_token_ids": p} for p in first], params, use_tqdm=False)
        second = [p + list(a.outputs[0].token_ids) + [7, 8, 9] for p, a in zip(first, answers)][::-1]
        outputs = llm.generate([{"prompt_token_ids": p} for p in second], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs], llm.last_stats

    options = dict(device="cpu", dtype="float32", skip_tokenizer_init=True)
    one = LLM(model, **options)
    try:
        expected, one_stats = two_rounds(one)
    finally:
        one.shutdown()
    llm = LLM(model, engines_per_gpu=2, **options)
    try:
        got, stats = two_rounds(llm)
    finally:
        llm.shutdown()
    assert got == expected
    assert all(r["num_requests"] for r in stats["ranks"])  # both ranks worked
    # every continuation found its first turn's blocks: as many tokens as the one engine took from its cache
    assert stats["kept_prefill_tokens"] == one_stats["kept_prefill_tokens"] > 500
    assert stats["placed_on_held_tokens"] > 0


def test_a_killed_worker_fails_the_job_by_name_after_the_others_finish(default_model_dir):
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu", max_model_len=2048, data_parallel_size=2)
    try:
        victim = llm._data_parallel.processes[1]
        got = []
        with pytest.raises(WorkerDied, match="rank 1: killed by SIGKILL"):
            for i, (index, _) in enumerate(llm._data_parallel.generate(
                    [llm.tokenize_prompt(c) for c in
                     [llm.apply_chat_template(c) for c in _chats()]],
                    # the answers of each system's group end at different steps (8 to 44 tokens), so the first to
                    # come back leaves each rank's longer ones running: rank 1 is killed mid-job, not after it
                    [SamplingParams(temperature=0, max_tokens=8 + 12 * (k % len(QUESTIONS)), ignore_eos=True)
                     for k in range(len(_chats()))], use_tqdm=False)):
                got.append(index)
                if i == 0:
                    os.kill(victim.pid, signal.SIGKILL)
        assert got  # results that came back are kept
        with pytest.raises(WorkerDied, match="closed"):
            llm.generate(["hi"], SamplingParams(max_tokens=1), use_tqdm=False)
    finally:
        llm.shutdown()


def test_cli_resumes_after_the_parent_is_killed(tmp_path, default_model_dir, default_llm):
    lines = [{"id": f"q{i}", "messages": c, "max_tokens": 6, "temperature": 0} for i, c in enumerate(_chats())]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "batchllm.cli", "run", str(src), "-o", str(out), "--model", str(default_model_dir),
           "--device", "cpu", "--data-parallel-size", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)

    def kill_after_first_record():
        while proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 1:
                proc.kill()
                return
    watcher = threading.Thread(target=kill_after_first_record)
    watcher.start()
    proc.wait(600)
    watcher.join()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(x["id"] for x in lines)  # each line exactly once
    expected = default_llm.chat(_chats(), SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert {r["id"]: r["token_ids"] for r in records} == {f"q{i}": o.outputs[0].token_ids
                                                          for i, o in enumerate(expected)}


def test_an_interrupt_while_the_workers_build_stops_them():
    """Workers leave Ctrl-C to the parent: an interrupt while they built their engines left them running, each
    holding an engine, where the caller kept the exception (a notebook)."""
    from batchllm.parallel.data_parallel import DataParallelEngine

    engine = DataParallelEngine.__new__(DataParallelEngine)  # (no processes: the protocol around them)
    stopped = []

    def interrupted(timeout_s):
        raise KeyboardInterrupt

    engine._wait_ready, engine.shutdown = interrupted, lambda: stopped.append(True)
    with pytest.raises(KeyboardInterrupt):
        engine.wait_ready()
    assert stopped == [True]


def test_a_worker_killed_between_calls_is_named_and_a_collected_llm_stops_its_workers(tiny_model_factory):
    """A worker dead before a call's job was sent: the call raises WorkerDied naming it (it raised a bare
    BrokenPipeError, and so did every later call); an LLM collected without shutdown() stops its workers, as
    vLLM's engine processes stop when its LLM is collected."""
    import gc
    import weakref

    options = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, data_parallel_size=2)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8 + i]} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm = LLM(tiny_model_factory("llama"), **options)
    try:
        llm.generate(prompts, params, use_tqdm=False)
        victim = llm._data_parallel.processes[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        for _ in range(2):
            with pytest.raises(WorkerDied, match="worker 0 killed by SIGKILL between jobs"):
                llm.generate(prompts, params, use_tqdm=False)
        assert not any(p.is_alive() for p in [victim, *llm._data_parallel.processes])
    finally:
        llm.shutdown()

    llm = LLM(tiny_model_factory("llama"), **options)
    workers = list(llm._data_parallel.processes)
    llm.generate(prompts, params, use_tqdm=False)
    collected = weakref.ref(llm)
    del llm
    gc.collect()
    assert collected() is None
    for p in workers:
        p.join(30)
    assert not any(p.is_alive() for p in workers)


def test_an_llm_built_in_a_thread_that_ended_keeps_its_workers(tiny_model_factory):
    """Workers died with the thread that started them (Linux's parent-death signal is the thread's): an LLM built
    in a thread pool's thread, used after, failed with "worker 0 killed by SIGKILL between jobs". They now end
    with the parent process only, as vLLM's workers do."""
    options = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, data_parallel_size=2)
    built = []
    thread = threading.Thread(target=lambda: built.append(LLM(tiny_model_factory("llama"), **options)))
    thread.start()
    thread.join()
    llm = built[0]
    try:
        time.sleep(0.5)
        assert all(p.is_alive() for p in llm._data_parallel.processes)
        outputs = llm.generate([{"prompt_token_ids": [5, 6, 7, 8 + i]} for i in range(4)],
                               SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outputs] == [2] * 4
    finally:
        llm.shutdown()


def test_a_worker_whose_parent_is_already_gone_ends(tmp_path):
    """die_with_parent's watch starts only once the worker runs: a worker that finds its parent already gone
    ends at once (it went on to build a whole engine)."""
    script = tmp_path / "orphan.py"
    pid_file = tmp_path / "child.pid"
    script.write_text(f"""
import multiprocessing as mp, os, time
def child():
    open({str(pid_file)!r}, "w").write(str(os.getpid()))
    time.sleep(2)  # the parent exits meanwhile
    from batchllm.parallel.data_parallel import die_with_parent
    die_with_parent()
    time.sleep(60)
if __name__ == "__main__":
    mp.get_context("spawn").Process(target=child).start()
    while not os.path.exists({str(pid_file)!r}):
        time.sleep(0.05)
    os._exit(0)
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, str(script)], timeout=60, env=env, check=True)
    pid = int(pid_file.read_text())
    def running() -> bool:
        try:  # (an orphan's parent may never reap it: a zombie has ended)
            return open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1][0] not in "ZX"
        except OSError:
            return False

    deadline = time.monotonic() + 20
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(), "the orphaned worker kept running"


def test_interrupts_and_failures_around_a_calls_job_leave_the_next_call_whole(tiny_model_factory, monkeypatch):
    """A review's probe of the data-parallel parent, two CPU workers; each time the next call gives the tokens of
    the first:
    - a second Ctrl-C while `_abort` tells the ranks to drop an interrupted call's job: a rank left in it read the next
      job as a protocol error and died, and the engine closed for good;
    - a progress bar that cannot be made: the enqueued prompts were lost while the workers ran them unread;
    - a call left suspended while its workers filled their pipes with results: the next call's job, sent before
      anything was read, left both sides blocked for ever; `shutdown` after such a call waited 30 s for the ranks."""
    from batchllm.parallel import data_parallel
    from tests.helpers import within

    model = tiny_model_factory("llama")
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(10, 1000) for _ in range(30)]} for _ in range(40)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = LLM(model, data_parallel_size=2, device="cpu", dtype="float32", skip_tokenizer_init=True,
              max_model_len=256, num_kv_blocks=64)
    try:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finished, sent = data_parallel._JobProgress.finished, data_parallel.DataParallelEngine._sent

        def first_interrupt(self, index, output):
            monkeypatch.setattr(data_parallel._JobProgress, "finished", finished)
            raise KeyboardInterrupt("first")

        def second_interrupt(self, rank, message):
            if message is not None and message[0] == "abort" and rank == 1:
                monkeypatch.setattr(data_parallel.DataParallelEngine, "_sent", sent)
                raise KeyboardInterrupt("second")
            return sent(self, rank, message)

        monkeypatch.setattr(data_parallel._JobProgress, "finished", first_interrupt)
        monkeypatch.setattr(data_parallel.DataParallelEngine, "_sent", second_interrupt)
        with pytest.raises(KeyboardInterrupt, match="second"):
            llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected

        def vllms_keywords_refused(total, desc):  # (vLLM calls a bar with dynamic_ncols and postfix too)
            raise AssertionError("not reached")

        llm.enqueue(prompts, params, use_tqdm=False)
        with pytest.raises(TypeError):
            llm.wait_for_completion(use_tqdm=vllms_keywords_refused)
        assert [o.outputs[0].token_ids for o in llm.wait_for_completion(use_tqdm=False)] == expected

        wordy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=20, prompt_logprobs=20)
        many = prompts * 10
        suspended = llm.iter_generate([llm.tokenize_prompt(p) for p in many], [wordy] * len(many), use_tqdm=False)
        next(suspended)
        time.sleep(3)  # (the workers run on, their results unread: a pipe holds some 200 KB)
        long = [{"prompt_token_ids": p["prompt_token_ids"] * 8} for p in prompts] * 3  # (a job over 200 KB)
        # (before: the next call's job and the dropped call's results blocked each other for ever)
        assert len(within(240, lambda: llm.generate(long, params, use_tqdm=False))) == len(long)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
        dropped = llm.iter_generate([llm.tokenize_prompt(p) for p in many], [wordy] * len(many), use_tqdm=False)
        next(dropped)
        dropped.close()  # (its job aborted, its ranks blocked writing results: shutdown waited 30 s for each)
        time.sleep(3)
        began = time.monotonic()
        llm.shutdown()
        assert time.monotonic() - began < 10
    finally:
        llm.shutdown()
