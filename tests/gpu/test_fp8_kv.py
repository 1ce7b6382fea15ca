"""The FP8 KV cache on the device: every Triton attention path (prefill tiles, decode, prefix-shared
items, split-K and its merge) over an fp8 cache against the torch reference over the same cache
(tight) and over the unquantized cache (loose); scales read on the device by replayed graphs; the
engine with decode CUDA graphs and an fp8 cache."""

from __future__ import annotations

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.attention.backend import AttentionMetadata
from batchllm.attention.kv_quant import quantize_cache
from batchllm.attention.torch_ref import TorchReferenceBackend
from batchllm.layers.fp8 import FP8
from tests.attention_cases import group_decode, poison_unwritten_slots, random_case
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.gpu

FP8_VS_FULL = 0.06
"""Relative L2 error of attention over an e4m3 cache against the unquantized cache, random inputs:
0.035-0.038 on CPU in float32 (tests/unit/test_kv_fp8.py)."""


def scales(k: float, v: float) -> torch.Tensor:
    """[2] float32 on the device, 16-byte aligned (as the model's per-layer rows)."""
    return torch.tensor([k, v, 0.0, 0.0], device="cuda")[:2]


CASES = [
    # name, specs, heads, kv heads, head dim, backend options
    ("decode-gqa4", [(37, 1), (300, 1), (1, 1), (4000, 1)], 32, 8, 128, {}),
    ("decode-mha", [(100, 1), (17, 1)], 8, 8, 64, {}),
    ("prefill-fresh", [(0, 77), (0, 1), (0, 300)], 32, 8, 128, {}),
    ("chunk-with-context", [(256, 64), (1000, 200), (3, 5)], 28, 4, 128, {}),
    ("mixed", [(500, 1), (0, 129), (33, 1), (64, 64)], 9, 3, 64, {}),
    ("prefix-shared", group_decode(16, 2000, 200), 32, 8, 128, dict(min_members=1, min_shared=1)),
    ("prefix-shared-and-plain", group_decode(20, 300, 7, 0) + group_decode(3, 1000, 0, 1)
     + [(0, 100), (50, 1), (2000, 33)], 32, 4, 128, dict(min_members=1, min_shared=1)),
    ("nested-groups", [(610 + j, 1, [(0, 300), (1 + j % 3, 600)]) for j in range(15)] + [(350, 1, [(0, 300)])] * 4,
     32, 8, 128, dict(min_members=1, min_shared=1)),
    ("split-k", [(16000, 1), (3000, 1), (40, 1), (1000, 64)] + group_decode(4, 5000, 900), 32, 8, 128,
     dict(split_len=512)),
]


@pytest.mark.parametrize("block_size", [16, 64], ids=["bs16", "bs64-v-keys-major"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name, specs, heads, kv_heads, head_dim, options", CASES, ids=[c[0] for c in CASES])
def test_triton_over_fp8_cache_matches_reference(name, specs, heads, kv_heads, head_dim, options, dtype, block_size):
    """Every path over an fp8 cache against the reference over the same cache; on 64-token blocks V
    is keys-major (`kv_quant.values_keys_major`) and read in whole tiles, past each sequence's end too
    (random values there: they must weigh nothing)."""
    check_fp8_paths(name, specs, heads, kv_heads, head_dim, options, dtype, block_size)


@pytest.mark.parametrize("block_size", [64, 128], ids=["bs64", "bs128"])
@pytest.mark.parametrize("name, specs, heads, kv_heads, head_dim, options", CASES, ids=[c[0] for c in CASES])
def test_engine_decode_tile_over_fp8_blocks_matches_reference(name, specs, heads, kv_heads, head_dim, options,
                                                              block_size):
    """The decode tile the engine gives an fp8 cache of 64-token blocks (`decode_tile_for`: 3 stages,
    DECODE_TILE_TMA's) and of 128-token blocks (DECODE_TILE_FP8, whole in a block) on every path, as the
    default tile's test above."""
    from batchllm.attention.triton_backend import DECODE_TILE_FP8, DECODE_TILE_TMA, decode_tile_for

    tile = decode_tile_for(FP8, block_size, torch.bfloat16, head_dim)
    assert tile == {64: DECODE_TILE_TMA, 128: DECODE_TILE_FP8}[block_size]
    check_fp8_paths(name, specs, heads, kv_heads, head_dim, dict(options, decode_tile=tile), torch.bfloat16,
                    block_size)


def check_fp8_paths(name, specs, heads, kv_heads, head_dim, options, dtype, block_size):
    """A random case through `TritonBackend(**options)` over its fp8 cache: the bytes stored, the output
    against the reference over the same cache (tight) and the unquantized cache (loose), and the
    prefix-shared or split-K path taken where the options ask for it."""
    from batchllm.attention.triton_backend import TritonBackend

    q, k, v, cache, md = random_case(specs, heads, kv_heads, head_dim, block_size, dtype, seed=7)
    scale, kv_scale = head_dim ** -0.5, scales(0.75, 1.5)
    fp8 = quantize_cache(cache, kv_scale)
    ref_cache = fp8.clone()
    ref = TorchReferenceBackend().forward(q.float(), k.float(), v.float(), ref_cache, md, scale, kv_scale)
    out = TritonBackend(**options).forward(q, k, v, fp8, md, scale, kv_scale)
    torch.cuda.synchronize()
    assert out.dtype == dtype and not torch.isnan(out).any()
    assert torch.equal(fp8.view(torch.uint8), ref_cache.view(torch.uint8)), "the new K/V stored as the same bytes"
    err = float((out.float() - ref).norm() / ref.norm())
    assert err < (1e-4 if dtype == torch.float32 else 2e-2), f"{name} {dtype}: {err:.2e} from the fp8 reference"
    full = TorchReferenceBackend().forward(q.float(), k.float(), v.float(), cache.float(), md, scale)
    err_full = float((out.float() - full).norm() / full.norm())
    assert err_full < FP8_VS_FULL, f"{name} {dtype}: {err_full:.3f} from the unquantized cache"
    [plan] = [p for key, p in md.backend_cache.items() if key[0] == "triton_items"]
    if "min_members" in options:
        assert plan.items.num_group_items > 0, "the prefix-shared path ran"
    if "split_len" in options:
        assert len(plan.items.merge_tokens) > 0, "split-K partials were merged"


def poisoned_fp8_case(specs, heads: int, kv_heads: int, head_dim: int):
    """(q, k, v, fp8 cache, metadata, softmax scale, kv_scale): bf16 queries over an fp8 cache of 64-token
    blocks (V keys-major) with scales (0.75, 1.5), NaN in K's unwritten slots."""
    q, k, v, cache, md = random_case(specs, heads, kv_heads, head_dim, 64, torch.bfloat16, seed=7)
    kv_scale = scales(0.75, 1.5)
    fp8 = quantize_cache(cache, kv_scale)
    poison_unwritten_slots(fp8, md, halves=(0,))
    return q, k, v, fp8, md, head_dim ** -0.5, kv_scale


@pytest.mark.parametrize("fp8_attention", [False, True], ids=["cast-up", "fp8-dots"])
@pytest.mark.parametrize("name, specs, heads, kv_heads, head_dim, options", CASES, ids=[c[0] for c in CASES])
def test_tma_tiles_over_fp8_cache_match_pointer_loads(name, specs, heads, kv_heads, head_dim, options, fp8_attention):
    """On Hopper an fp8 cache of 64-token blocks (V keys-major) loads its unmasked tiles by TMA with
    `tma=True` (not by default): every item kind, bf16 queries, NaN in K's unwritten slots, against the
    same kernel with pointer loads (`tma=False`), cast up and with FP8 dots."""
    from batchllm.attention.triton_backend import TritonBackend

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9 (Hopper) or later")
    q, k, v, fp8, md, scale, kv_scale = poisoned_fp8_case(specs, heads, kv_heads, head_dim)
    # (not staged: TMA over the fp8 cache itself; the staged copy's tiles are the next test's)
    backend = TritonBackend(fp8_attention=fp8_attention, tma=True, stage_fp8_prefill=False, **options)
    assert backend.uses_tma(fp8, head_dim) and not TritonBackend().uses_tma(fp8, head_dim)
    with_tma = backend.forward(q, k, v, fp8.clone(), md, scale, kv_scale).float()
    md.backend_cache.clear()
    without = TritonBackend(fp8_attention=fp8_attention, tma=False, stage_fp8_prefill=False, **options).forward(
        q, k, v, fp8.clone(), md, scale, kv_scale).float()
    torch.cuda.synchronize()
    assert not torch.isnan(with_tma).any()
    err = float((with_tma - without).norm() / without.norm())
    assert err < 1e-2, f"{name}: TMA against pointer loads, relative difference {err:.2e}"


@pytest.mark.parametrize("name, specs, heads, kv_heads, head_dim, options", CASES, ids=[c[0] for c in CASES])
def test_staged_prefill_over_fp8_cache_matches_the_direct_launch(name, specs, heads, kv_heads, head_dim, options):
    """On Hopper the prefill launch over an fp8 cache reads an fp16 copy of its blocks by default
    (`stage_fp8_prefill`): bf16 queries, 64-token blocks (V keys-major), NaN in K's unwritten slots,
    against the same prefill tiles read from the fp8 cache itself by TMA: the same values reach dots of
    the same shapes (bit for bit in the interpreter), held here to 1e-3 relative."""
    from batchllm.attention.triton_backend import TMA_PREFILL_LAUNCH, TritonBackend

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the staged default and TMA need compute capability 9 (Hopper) or later")
    q, k, v, fp8, md, scale, kv_scale = poisoned_fp8_case(specs, heads, kv_heads, head_dim)
    assert TritonBackend().stages_prefill(fp8, head_dim, torch.bfloat16)
    assert not TritonBackend().stages_prefill(fp8, head_dim, torch.float32)
    staged = TritonBackend(**options).forward(q, k, v, fp8.clone(), md, scale, kv_scale).float()
    [plan] = [p for key, p in md.backend_cache.items() if key[0] == "triton_items"]
    md.backend_cache.clear()
    direct = TritonBackend(stage_fp8_prefill=False, tma=True, prefill_launch=TMA_PREFILL_LAUNCH, **options).forward(
        q, k, v, fp8.clone(), md, scale, kv_scale).float()
    torch.cuda.synchronize()
    assert not torch.isnan(staged).any()
    assert any(launch.staged for launch in plan.launches) == any(n > 1 for _, n, *_ in specs)
    err = float((staged - direct).norm() / direct.norm())
    assert err < 1e-3, f"{name}: staged against direct, relative difference {err:.2e}"


def test_replayed_graph_reads_the_scales_on_the_device():
    """An fp8 decode step captured once: replays give the eager backend's output bit for bit, and
    follow the scale tensors' current values (read by the kernel, not baked into the graph)."""
    from batchllm.attention.static_decode_plan import StaticDecodePlan
    from batchllm.attention.triton_backend import TritonBackend

    heads, kv_heads, head_dim, block_size, size = 32, 8, 128, 16, 32
    backend = TritonBackend()
    plan = StaticDecodePlan(backend, size, heads, kv_heads, head_dim, torch.device("cuda"), block_size=block_size)
    specs = group_decode(20, 300, 7, 0) + [(50, 1), (3000, 1)]
    q, k, v, case_cache, md = random_case(specs, heads, kv_heads, head_dim, block_size, torch.bfloat16, seed=1)
    kv_scale = scales(1.0, 1.0)
    num_blocks = case_cache.shape[1]
    cache = torch.zeros(2, num_blocks + 1, block_size, kv_heads, head_dim, dtype=torch.uint8, device="cuda")
    cache = cache.view(FP8)
    q_buf = torch.zeros(size, heads, head_dim, dtype=torch.bfloat16, device="cuda")
    k_buf, v_buf = torch.zeros(2, size, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    tables = torch.zeros(size, md.block_tables.shape[1], dtype=torch.int32, device="cuda")
    slots = torch.full((size,), num_blocks * block_size, dtype=torch.int64, device="cuda")
    static = AttentionMetadata(
        num_tokens=size, block_size=block_size, slot_mapping=slots,
        query_start_loc=torch.arange(size + 1, dtype=torch.int32, device="cuda"),
        seq_lens=torch.ones(size, dtype=torch.int32, device="cuda"), block_tables=tables, max_query_len=1,
        max_seq_len=1, query_start_loc_cpu=list(range(size + 1)), seq_lens_cpu=[1] * size, block_tables_cpu=[])
    plan.install(static, size)
    scale = head_dim ** -0.5
    backend.forward(q_buf, k_buf, v_buf, cache, static, scale, kv_scale)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q_buf, k_buf, v_buf, cache, static, scale, kv_scale)
    n = len(q)
    q_buf[:n], k_buf[:n], v_buf[:n] = q, k, v
    tables[:n] = md.block_tables
    slots[:n] = md.slot_mapping
    assert plan.fill(md.query_start_loc_cpu, md.seq_lens_cpu, md.share_levels_cpu, size)
    for k_scale, v_scale in ((1.0, 1.0), (0.5, 2.0)):
        kv_scale.copy_(torch.tensor([k_scale, v_scale]))  # in place: the graph holds the address
        cache[:, :num_blocks] = quantize_cache(case_cache, kv_scale)
        want = backend.forward(q, k, v, cache[:, :num_blocks].clone(), md, scale, kv_scale)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[:n], want), f"scales {k_scale}, {v_scale}"
        assert not out[n:].any()


MIN_MATCHING_TOKENS = 0.7
"""Share of output positions, up to each prompt's first difference, where the fp8 and bf16 caches give
the same greedy token: 0.85 (llama) and 0.92 (qwen3) for this workload on CPU (reference attention);
these tiny random models fork at near-ties within 24 tokens (0-1 of 9 outputs identical)."""


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny_dir(request, tmp_path_factory):
    return str(make_tiny_model(request.param, tmp_path_factory.mktemp(request.param)))


def run(model_dir, dtype, *, eager, block_size=16, **kwargs):
    llm = LLM(model_dir, device="cuda", dtype=dtype, skip_tokenizer_init=True, max_num_batched_tokens=64,
              block_size=block_size, kv_cache_memory_gib=1, enforce_eager=eager, **kwargs)
    shared = list(range(10, 310))  # long enough to be attended as a group (work_items.MIN_SHARED_TOKENS)
    prompts = [{"prompt_token_ids": shared + [100 + i] * (i + 1)} for i in range(6)]
    prompts += [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 90, 700)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)], llm


@pytest.mark.parametrize("block_size", [16, 64], ids=["bs16", "bs64-v-keys-major"])
def test_fp8_graphs_give_the_tokens_of_fp8_eager_steps(tiny_dir, block_size):
    """float32 model, fp8 cache: graphs and eager steps compute the same attention over the same bytes."""
    eager, _ = run(tiny_dir, "float32", eager=True, kv_cache_dtype="fp8", block_size=block_size)
    got, llm = run(tiny_dir, "float32", eager=False, kv_cache_dtype="fp8", block_size=block_size)
    assert llm.engine.runner.num_graph_steps > 0 and llm.engine.runner.kv_cache.dtype == FP8
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]


@pytest.mark.parametrize("block_size", [16, 64], ids=["bs16", "bs64-v-keys-major"])
def test_fp8_cache_with_graphs_agrees_with_bf16_cache_and_holds_twice_the_tokens(tiny_dir, block_size):
    full, full_llm = run(tiny_dir, "bfloat16", eager=False, block_size=block_size)
    got, llm = run(tiny_dir, "bfloat16", eager=False, kv_cache_dtype="fp8", block_size=block_size)
    assert llm.engine.runner.num_graph_steps > 0
    matched = compared = 0
    for a, b in zip(got, full):
        for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
            compared += 1
            if ta != tb:  # first divergence: each side's token is in the other's top 5
                assert ta in b.logprobs[i] and tb in a.logprobs[i]
                break
            matched += 1
    print(f"fp8 vs bf16 KV: {matched / compared:.3f} of positions (to the first difference) equal")
    assert matched / compared >= MIN_MATCHING_TOKENS
    assert llm.engine.kv_spec.num_blocks == 2 * full_llm.engine.kv_spec.num_blocks  # 1 GiB divides evenly
    assert llm.last_stats["kv_tokens"] == 2 * full_llm.last_stats["kv_tokens"]
    assert llm.last_stats["kv_cache_dtype"] == "float8_e4m3fn"


FP8_ATTENTION_VS_EMULATION = 1.5
"""fp8_attention's relative L2 error against exact attention over the same fp8 cache may be this many
times the CPU emulation's (`torch_ref.fp8_attention`): the kernel rounds p against the running
maximum, the emulation against the row's (on CPU, in the interpreter, the ratio stays under 1.5)."""


@pytest.mark.parametrize("block_size", [16, 64], ids=["bs16", "bs64-v-keys-major"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name, specs, heads, kv_heads, head_dim, options", CASES, ids=[c[0] for c in CASES])
def test_fp8_attention_errs_like_its_emulation(name, specs, heads, kv_heads, head_dim, options, dtype, block_size):
    """The kernel's FP8_DOTS path (e4m3 operands in both dots) on every item kind, against exact
    attention over the same fp8 cache: an error the size of the emulation's, and not zero."""
    from batchllm.attention.triton_backend import TritonBackend

    q, k, v, cache, md = random_case(specs, heads, kv_heads, head_dim, block_size, dtype, seed=7)
    scale, kv_scale = head_dim ** -0.5, scales(0.75, 1.5)
    fp8 = quantize_cache(cache, kv_scale)
    exact = TorchReferenceBackend().forward(q.float(), k.float(), v.float(), fp8.clone(), md, scale, kv_scale)
    emulated = TorchReferenceBackend(fp8_attention=True).forward(q.float(), k.float(), v.float(), fp8.clone(), md,
                                                                  scale, kv_scale)
    out = TritonBackend(fp8_attention=True, **options).forward(q, k, v, fp8, md, scale, kv_scale).float()
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    emulation_err = float((emulated - exact).norm() / exact.norm())
    err = float((out - exact).norm() / exact.norm())
    bound = FP8_ATTENTION_VS_EMULATION * emulation_err + 2e-3
    assert 0 < err <= bound, f"{name} {dtype}: {err:.4f} against the emulation's {emulation_err:.4f}"


def test_fp8_attention_graphs_give_the_tokens_of_eager_steps(tiny_dir):
    """float32 model, fp8 cache, FP8 attention: graphs replay the eager steps' arithmetic."""
    eager, _ = run(tiny_dir, "float32", eager=True, kv_cache_dtype="fp8", fp8_attention=True)
    got, llm = run(tiny_dir, "float32", eager=False, kv_cache_dtype="fp8", fp8_attention=True)
    assert llm.engine.runner.num_graph_steps > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]
