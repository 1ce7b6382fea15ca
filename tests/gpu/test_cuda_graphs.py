"""Decode steps as CUDA graphs on the device: the engine's tokens with graphs equal its tokens without
(fp32), through prefix-shared attention, split-K, stops, seeded sampling, asynchronous scheduling and
batches larger than the largest graph; in bf16 the two agree up to the top 5."""

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.attention.backend import AttentionMetadata
from tests.attention_cases import group_decode, random_case
from tests.helpers import VOCAB, make_tiny_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny_dir(request, tmp_path_factory):
    return str(make_tiny_model(request.param, tmp_path_factory.mktemp(request.param)))


def workload():
    shared = list(range(10, 310))  # long enough to be attended as a group (work_items.MIN_SHARED_TOKENS)
    prompts = [{"prompt_token_ids": shared + [100 + i] * (i + 1)} for i in range(6)]
    prompts += [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 90, 700)]
    stops = list(range(0, VOCAB, 7))
    params = [SamplingParams(temperature=0, max_tokens=24, stop_token_ids=stops, logprobs=5) for _ in range(4)]
    params += [SamplingParams(temperature=0, max_tokens=8 + 3 * i, ignore_eos=True, logprobs=5) for i in range(2)]
    params += [SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=20, logprobs=5) for i in range(3)]
    return prompts, params


def run(model_dir, dtype, *, eager, max_size=512, **kwargs):
    llm = LLM(model_dir, device="cuda", dtype=dtype, skip_tokenizer_init=True, max_num_batched_tokens=64,
              block_size=16, kv_cache_memory_gib=1, enforce_eager=eager, max_cudagraph_capture_size=max_size,
              **kwargs)
    prompts, params = workload()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0] for o in outputs], llm.engine.runner


@pytest.mark.parametrize("max_size", [512, 4])
def test_graphs_give_the_tokens_of_eager_steps(tiny_dir, max_size):
    """max_size 4: steps of 5 to 9 sequences run eagerly, smaller ones as graphs (sizes 1, 2, 4)."""
    eager, eager_runner = run(tiny_dir, "float32", eager=True)
    got, runner = run(tiny_dir, "float32", eager=False, max_size=max_size)
    assert eager_runner.decode_graphs is None and eager_runner.num_graph_steps == 0
    assert runner.num_graph_steps > 0
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in eager]
    assert {o.finish_reason for o in got} == {"stop", "length"}


def test_small_models_run_decode_steps_of_more_than_512_sequences_as_graphs(tiny_dir):
    """The default capture size of a small model (hidden size <= 2,048: `engine.default_graph_batch`) takes
    decode steps of 600 sequences, past 512, through a graph of the sizes beyond 512 (576, 640), with the
    eager steps' tokens."""
    prompts = [{"prompt_token_ids": [3 + i % 50, 7 + i % 13, 11 + i % 29]} for i in range(600)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tokens = {}
    for eager in (True, False):
        llm = LLM(tiny_dir, device="cuda", dtype="float32", skip_tokenizer_init=True, block_size=16,
                  kv_cache_memory_gib=1, enforce_eager=eager)
        tokens[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        runner = llm.engine.runner
        if not eager:
            assert runner.decode_graphs.max_batch == 8192 and 640 in runner.decode_graphs.sizes
            assert runner.num_graph_steps >= 5  # every decode step: 600 sequences at once
        llm.shutdown()
    assert tokens[False] == tokens[True]


def test_graphs_in_synchronous_mode_too(tiny_dir):
    eager, _ = run(tiny_dir, "float32", eager=True, async_scheduling=False)
    got, runner = run(tiny_dir, "float32", eager=False, async_scheduling=False)
    assert runner.num_graph_steps > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]


def test_bf16_graphs_agree_with_eager_up_to_top5(tiny_dir):
    eager, _ = run(tiny_dir, "bfloat16", eager=True)
    got, runner = run(tiny_dir, "bfloat16", eager=False)
    assert runner.num_graph_steps > 0
    for a, b in zip(got, eager):
        for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
            if ta != tb:  # first divergence: each side's token is in the other's top 5
                assert ta in b.logprobs[i] and tb in a.logprobs[i]
                break


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_replayed_attention_equals_eager_attention(dtype, block_size):
    """The attention alone, captured once in a graph of 64 rows and replayed over steps of other
    shapes (prefix groups, nested groups, split-K, 1 to 64 sequences): the eager backend's output,
    bit for bit (the same kernels over the same items), and 0 in the padding rows; on 64-token
    blocks too, where both plans start items on tile boundaries (`key_alignment`)."""
    from batchllm.attention.static_decode_plan import StaticDecodePlan
    from batchllm.attention.triton_backend import TritonBackend

    heads, kv_heads, head_dim, size = 32, 8, 128, 64
    backend = TritonBackend()
    plan = StaticDecodePlan(backend, size, heads, kv_heads, head_dim, torch.device("cuda"), block_size=block_size)
    steps = [
        group_decode(20, 300, 7, 0) + group_decode(5, 1000, 0, 1) + [(50, 1), (16000, 1)],
        [(610 + j, 1, [(0, 300), (1 + j % 3, 600)]) for j in range(40)] + [(350, 1, [(0, 300)])] * 8,
        [(4000, 1)] * 3,
        [(7, 1)],
        group_decode(64, 4000, 30),
    ]
    cases = [random_case(specs, heads, kv_heads, head_dim, block_size, dtype, seed) for seed, specs in enumerate(steps)]
    num_blocks = max(case[3].shape[1] for case in cases)
    pad_slot = num_blocks * block_size
    cache = torch.zeros(2, num_blocks + 1, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
    q_buf = torch.zeros(size, heads, head_dim, dtype=dtype, device="cuda")
    k_buf, v_buf = torch.zeros(2, size, kv_heads, head_dim, dtype=dtype, device="cuda")
    tables = torch.zeros(size, 16000 // block_size + 2, dtype=torch.int32, device="cuda")
    slots = torch.full((size,), pad_slot, dtype=torch.int64, device="cuda")
    static = AttentionMetadata(
        num_tokens=size, block_size=block_size, slot_mapping=slots,
        query_start_loc=torch.arange(size + 1, dtype=torch.int32, device="cuda"),
        seq_lens=torch.ones(size, dtype=torch.int32, device="cuda"), block_tables=tables, max_query_len=1,
        max_seq_len=1, query_start_loc_cpu=list(range(size + 1)), seq_lens_cpu=[1] * size, block_tables_cpu=[])
    plan.install(static, size)
    scale = head_dim ** -0.5
    backend.forward(q_buf, k_buf, v_buf, cache, static, scale)  # compile outside capture (all counts 0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q_buf, k_buf, v_buf, cache, static, scale)
    for q, k, v, case_cache, md in cases:
        n = len(q)
        want = backend.forward(q, k, v, case_cache.clone(), md, scale)
        cache[:, :case_cache.shape[1]] = case_cache
        q_buf[:n], k_buf[:n], v_buf[:n] = q, k, v
        tables[:n, :md.block_tables.shape[1]] = md.block_tables
        slots.fill_(pad_slot)
        slots[:n] = md.slot_mapping
        assert plan.fill(md.query_start_loc_cpu, md.seq_lens_cpu, md.share_levels_cpu, size)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[:n], want), f"{n} sequences"
        assert not out[n:].any()


def test_graphs_capture_while_dropped_engines_wait_for_the_collector(tiny_dir, monkeypatch):
    """An engine dropped without `shutdown` sits in reference cycles until Python's collector runs, and torch's
    `cuda.graph` no longer collects before a capture: a collection inside a capture freed the dropped engine's CUDA
    objects there, and the capture failed ("operation failed due to a previous error during capture", a GPU test run
    of session 61). Here a collection runs inside the first capture while two dropped engines wait: the new engine
    still builds and generates, and the dropped ones are freed."""
    import gc
    import weakref

    from batchllm.runner.cuda_graphs import DecodeGraphs

    def engine(**kwargs):
        return LLM(tiny_dir, device="cuda", dtype="bfloat16", skip_tokenizer_init=True, kv_cache_memory_gib=1,
                   max_cudagraph_capture_size=8, **kwargs)

    prompt = [{"prompt_token_ids": list(range(3, 40))}]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = engine().generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    engines = [engine() for _ in range(2)]  # (built before any is dropped: a build collects what was dropped)
    for llm in engines:
        llm.generate(prompt, params, use_tqdm=False)
    dropped = [weakref.ref(llm.engine.runner.decode_graphs) for llm in engines]
    del engines, llm
    assert all(ref() is not None for ref in dropped), "the dropped engines wait in cycles for the collector"
    forward, collected = DecodeGraphs._forward, []

    def collecting(self, size):
        if torch.cuda.is_current_stream_capturing() and not collected:
            collected.append(gc.collect())
        return forward(self, size)

    monkeypatch.setattr(DecodeGraphs, "_forward", collecting)
    llm = engine()
    assert collected, "a collection ran inside a capture"
    assert all(ref() is None for ref in dropped)
    assert llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == expected
    llm.shutdown()
