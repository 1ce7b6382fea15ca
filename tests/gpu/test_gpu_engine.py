"""The engine on the GPU: Triton attention and Triton norm/rotary/SiLU against the torch reference, end to end."""

import pytest

from batchllm import LLM, SamplingParams
from tests.helpers import VOCAB, interrupted_call_case, make_tiny_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny_dir(request, tmp_path_factory):
    return str(make_tiny_model(request.param, tmp_path_factory.mktemp(request.param)))


def run(model_dir, backend, dtype, prefix_sharing=True, **options):
    """backend "torch": the reference attention and torch norm/rotary/SiLU; "triton": Triton for both."""
    llm = LLM(model_dir, device="cuda", dtype=dtype, attention_backend=backend, kernels=backend,
              skip_tokenizer_init=True, max_num_batched_tokens=64, kv_cache_memory_gib=1,
              prefix_sharing=prefix_sharing, **{"block_size": 16, **options})
    shared = list(range(10, 310))  # long enough to be attended as a group (work_items.MIN_SHARED_TOKENS)
    prompts = [{"prompt_token_ids": shared + [100 + i] * (i + 1)} for i in range(6)]
    prompts += [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 90)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    return llm.generate(prompts, sp, use_tqdm=False)


def test_triton_fp32_equals_reference(tiny_dir):
    ref = run(tiny_dir, "torch", "float32")
    got = run(tiny_dir, "triton", "float32")
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]


def test_triton_bf16_agrees_with_reference_up_to_top5(tiny_dir):
    ref = run(tiny_dir, "torch", "bfloat16", prefix_sharing=False)
    got = run(tiny_dir, "triton", "bfloat16", prefix_sharing=True)
    assert_agree_up_to_top5(got, ref)


@pytest.mark.parametrize("dtype, block_size", [("bfloat16", 64), ("bfloat16", 16), ("float32", 16)])
def test_head_dim_256_runs_and_agrees_with_reference(tmp_path, dtype, block_size):
    """Head dim 256 in 16 bits asked more shared memory than an H200 has: the engine could not start (the
    HEAD_256 launches of `triton_backend`; blocks of 64 tokens load by TMA)."""
    model = str(make_tiny_model("llama", tmp_path / "m", head_dim=256))
    ref = run(model, "torch", dtype, prefix_sharing=False)
    got = run(model, "triton", dtype, block_size=block_size)
    if dtype == "float32":
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    else:
        assert_agree_up_to_top5(got, ref)


def assert_agree_up_to_top5(got, ref):
    for a, b in zip(got, ref):
        a, b = a.outputs[0], b.outputs[0]
        for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
            if ta != tb:  # first divergence: each side's token is in the other's top 5
                assert ta in b.logprobs[i] and tb in a.logprobs[i]
                break


@pytest.mark.parametrize("dtype, block_size, kv_cache_dtype", [("float32", 16, "auto"), ("bfloat16", 64, "auto"),
                                                              ("bfloat16", 64, "fp8")])
def test_a_second_call_takes_the_kv_the_first_left(tiny_dir, dtype, block_size, kv_cache_dtype):
    """On the device (Triton, CUDA graphs, asynchronous steps): a call continuing the sequences of the one before
    takes their KV, with and without a shared prefix above them, and generates what a fresh engine generates (fp32:
    the same tokens; bf16 and an fp8 cache: up to the top 5 where they part)."""
    shared = list(range(10, 310))
    first_prompts = [shared + [100 + i] * (i + 1) for i in range(6)] + [list(range(3, 95))]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=5)

    def engine():
        return LLM(tiny_dir, device="cuda", dtype=dtype, skip_tokenizer_init=True, max_num_batched_tokens=256,
                   block_size=block_size, kv_cache_memory_gib=1, kv_cache_dtype=kv_cache_dtype)

    llm = engine()
    first = llm.generate([{"prompt_token_ids": p} for p in first_prompts], params, use_tqdm=False)
    second = [{"prompt_token_ids": p + list(o.outputs[0].token_ids) + [7, 8, 9]} for p, o in zip(first_prompts, first)]
    got = llm.generate(second, params, use_tqdm=False)
    kept = llm.last_stats["kept_prefill_tokens"]
    llm.shutdown()
    fresh = engine()
    ref = fresh.generate(second, params, use_tqdm=False)
    fresh.shutdown()
    # the shared prefix takes all its KV (its full blocks, then a copy of the first call's prefix's partial last
    # block), each member its own past the prefix, the last prompt its own: the first call's prompt and outputs but
    # the last output (never written), in full blocks and a copy of the partial last one
    written = [len(p) + 39 for p in first_prompts]
    assert kept == 300 + sum(w - 300 for w in written[:6]) + written[6]
    if dtype == "float32":
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    else:
        assert_agree_up_to_top5(got, ref)


def test_async_scheduling_gives_the_tokens_of_sync(tiny_dir):
    """fp32, Triton, CUDA: scheduling each step while the one before runs (placeholders filled on the
    device, tokens read back a step late) changes no token, with stops and seeded sampling."""
    shared = list(range(10, 310))
    prompts = [{"prompt_token_ids": shared + [100 + i] * (i + 1)} for i in range(6)]
    prompts += [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 90)]
    stops = list(range(0, VOCAB, 5))  # ~1 token in 5 ends its request: some end at every step
    params = [SamplingParams(temperature=0, max_tokens=16, stop_token_ids=stops) for _ in range(4)]
    params += [SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=12, logprobs=2) for i in range(4)]

    def go(overlap):
        llm = LLM(tiny_dir, device="cuda", dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=64,
                  block_size=16, kv_cache_memory_gib=1, async_scheduling=overlap)
        assert llm.engine.core.async_scheduling is overlap
        return [(o.outputs[0].token_ids, o.outputs[0].finish_reason)
                for o in llm.generate(prompts, params, use_tqdm=False)]

    sync = go(False)
    assert "stop" in {reason for _, reason in sync}
    assert go(True) == sync


def test_shutdown_gives_the_device_memory_back(tiny_dir):
    """Another LLM can be built in the same process after shutdown: the weights, KV cache and
    graphs of the first are freed (benchmarks/tp_agreement.py builds TP=1 then TP=2 this way)."""
    import gc

    import torch

    gc.collect()  # (engines earlier tests dropped: else the build's collection frees them and hides its own memory)
    before = torch.cuda.memory_allocated()
    llm = LLM(tiny_dir, device="cuda", dtype="bfloat16", skip_tokenizer_init=True, kv_cache_memory_gib=2)
    llm.generate([{"prompt_token_ids": list(range(3, 40))}], SamplingParams(max_tokens=4), use_tqdm=False)
    assert torch.cuda.memory_allocated() - before > 2**31  # the KV cache alone is 2 GiB
    llm.shutdown()
    assert torch.cuda.memory_allocated() - before < 2**24


def test_a_build_sizes_its_cache_without_the_memory_of_an_llm_dropped_before_it(tmp_path):
    """An LLM dropped without `shutdown` (`del llm`) waits in reference cycles for Python's collector, holding its
    weights and KV cache. The next build collects it before measuring the memory its cache may take, as vLLM's
    worker does: it gets the first one's blocks, where it had found the first one's cache still held (too little
    memory left for a cache)."""
    import gc
    import weakref

    model_dir = str(make_tiny_model("llama", tmp_path))

    def engine():
        return LLM(model_dir, device="cuda", dtype="bfloat16", skip_tokenizer_init=True, enforce_eager=True,
                   gpu_memory_utilization=0.3)

    gc.collect()
    gc.disable()  # (no automatic collection: only a build's own may free the dropped LLM)
    try:
        first = engine()
        blocks = first.engine.kv_spec.num_blocks
        dropped = weakref.ref(first.engine.runner)
        del first
        assert dropped() is not None, "the dropped LLM waits in cycles for the collector"
        second = engine()
        assert second.engine.kv_spec.num_blocks >= 0.98 * blocks, (second.engine.kv_spec.num_blocks, blocks)
        assert dropped() is None
        out = second.generate([{"prompt_token_ids": list(range(3, 40))}],
                              SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
        second.shutdown()
    finally:
        gc.enable()


def test_profile_splits_kernel_time_between_decode_and_prefill_steps(tiny_dir):
    """The runner's step markers on CUDA: in a profile, each kind of step holds its own attention and
    matmul kernels (Triton's and cuBLAS's, eager and CUDA-graph), and together the steps hold nearly
    all of the run's kernel time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from batchllm.bench import time_by_step_kind

    llm = LLM(tiny_dir, device="cuda", dtype="bfloat16", skip_tokenizer_init=True, max_num_batched_tokens=64,
              block_size=16, kv_cache_memory_gib=1)
    prompts = [{"prompt_token_ids": list(range(10, 110)) + [200 + i]} for i in range(8)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # compiles outside the profile
    llm.reset_prefix_cache()  # (else the profiled call takes that prompt's KV, its shared prefix all but one token)
    llm.engine.runner.annotate_steps = True
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    split = time_by_step_kind(prof.events(), cuda=True)
    assert set(split) == {"decode", "prefill"}
    for categories in split.values():
        assert categories.get("attention", 0) > 0 and categories.get("matmul", 0) > 0
    kernels = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA
                  and not e.name.startswith("batchllm step"))
    assert sum(sum(c.values()) for c in split.values()) >= 0.9 * kernels


def test_named_token_logprobs_are_those_of_the_whole_vocabulary(tiny_dir):
    """logprob_token_ids on CUDA (fp32, Triton): each named token's logprob at every position equals its entry
    in the same prompt's whole-vocabulary logprobs, in one batch with a plain row."""
    llm = LLM(tiny_dir, device="cuda", dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=64,
              block_size=16, kv_cache_memory_gib=1, max_logprobs=-1)
    named = [7, 3, VOCAB - 1, 100]
    prompt = {"prompt_token_ids": list(range(10, 60))}
    whole, picked, plain = (o.outputs[0] for o in llm.generate([prompt] * 3, [
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=-1),
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprob_token_ids=named),
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)], use_tqdm=False))
    assert picked.token_ids == whole.token_ids == plain.token_ids and plain.logprobs is None
    for token, full, entry in zip(picked.token_ids, whole.logprobs, picked.logprobs):
        assert set(entry) == {token, *named}
        for t in entry:
            assert entry[t].logprob == pytest.approx(full[t].logprob, abs=1e-4)



@pytest.mark.parametrize("where, at", [("wait", 3), ("wait", 9), ("submit", 5)])
def test_a_call_interrupted_mid_step_leaves_the_engine_as_a_fresh_one(tiny_dir, monkeypatch, where, at):
    """On the device (asynchronous steps, CUDA graphs, a pool too small for the whole batch): see
    `tests.helpers.interrupted_call_case`."""
    interrupted_call_case(tiny_dir, "cuda", where, at, monkeypatch)
