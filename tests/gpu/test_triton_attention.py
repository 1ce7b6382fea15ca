"""The Triton paged attention kernel against the torch reference, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from batchllm.attention.torch_ref import TorchReferenceBackend
from tests.attention_cases import group_decode, poison_unwritten_slots, random_case

pytestmark = pytest.mark.gpu


CASES = [
    # name, specs, heads, kv heads, head dim, block size
    ("decode-gqa4", [(37, 1), (300, 1), (1, 1), (4000, 1)], 32, 8, 128, 16),
    ("decode-mha", [(100, 1), (17, 1)], 8, 8, 64, 16),
    ("decode-gqa8-16k", [(16000, 1), (5, 1)], 32, 4, 128, 16),
    ("prefill-fresh", [(0, 77), (0, 1), (0, 300)], 32, 8, 128, 16),
    ("chunk-with-context", [(256, 64), (1000, 200), (3, 5)], 28, 4, 128, 32),
    ("mixed-decode-and-prefill", [(500, 1), (0, 129), (33, 1), (64, 64)], 9, 3, 64, 16),
    ("gqa7", [(50, 20), (200, 1)], 28, 4, 128, 16),
    ("gqa1-headdim80", [(70, 30)], 4, 4, 80, 16),
    # blocks holding whole tiles (TILE_IN_BLOCK): one block index per tile for items from key 0
    ("prefill-block64", [(0, 1000), (0, 77), (0, 1), (2000, 200)], 32, 8, 128, 64),
    ("decode-block64", [(37, 1), (4000, 1), (63, 1), (64, 1)], 32, 8, 128, 64),
    ("chunk-block128", [(256, 300), (1000, 200), (3, 5)], 28, 4, 128, 128),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name, specs, heads, kv_heads, head_dim, block_size", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_reference(name, specs, heads, kv_heads, head_dim, block_size, dtype):
    from batchllm.attention.triton_backend import TritonBackend

    for seed in range(2):  # fresh inputs each time
        q, k, v, cache, md = random_case(specs, heads, kv_heads, head_dim, block_size, dtype, seed)
        scale = head_dim ** -0.5
        ref_cache = cache.float()  # a float32 copy: the reference computes in float32
        tri_cache = cache.clone()
        ref = TorchReferenceBackend().forward(q.float(), k.float(), v.float(), ref_cache, md, scale)
        out = TritonBackend().forward(q, k, v, tri_cache, md, scale)
        torch.cuda.synchronize()
        assert not torch.isnan(out).any()
        assert torch.equal(tri_cache.float(), ref_cache), "the new K/V land in the same slots"
        err = (out.float() - ref).norm() / ref.norm()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert err < tol, f"{name} {dtype}: relative error {err:.2e}"


SHARED_CASES = [
    # name, specs: (cached, new, group, shared positions) per sequence
    ("group-of-1", group_decode(1, 100, 5)),
    ("one-token-prefix", group_decode(8, 1, 20)),
    ("empty-own-suffix", group_decode(16, 64, 0)),
    ("degree16-2000", group_decode(16, 2000, 200)),
    ("group-of-256", group_decode(256, 500, 10)),
    ("prefix-16k", group_decode(16, 16000, 200)),
    ("groups-prefill-and-plain", group_decode(20, 300, 7, 0) + group_decode(3, 1000, 0, 1)
     + [(0, 100), (50, 1), (2000, 33)]),
    ("groups-and-plain-decodes", group_decode(20, 300, 7, 0) + group_decode(3, 1000, 0, 1) + [(50, 1), (2000, 1)]),
    ("nested-groups", [(610 + j, 1, [(0, 300), (1 + j % 3, 600)]) for j in range(15)] + [(350, 1, [(0, 300)])] * 4
     + [(100, 1)]),
]
HEADS = [(8, 8, 64), (32, 8, 128), (32, 4, 128)]  # GQA ratios 1, 4, 8


def check_against_reference(backend, q, k, v, cache, md, scale):
    ref_cache = cache.float()
    ref = TorchReferenceBackend().forward(q.float(), k.float(), v.float(), ref_cache, md, scale)
    out = backend.forward(q, k, v, cache.clone(), md, scale)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    err = (out.float() - ref).norm() / ref.norm()
    tol = 1e-4 if q.dtype == torch.float32 else 2e-2
    assert err < tol, f"relative error {err:.2e}"
    [plan] = [p for key, p in md.backend_cache.items() if key[0] == "triton_items"]
    return plan.items


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads, kv_heads, head_dim", HEADS, ids=["gqa1", "gqa4", "gqa8"])
@pytest.mark.parametrize("name, specs", SHARED_CASES, ids=[c[0] for c in SHARED_CASES])
def test_prefix_shared_attention_matches_reference(name, specs, heads, kv_heads, head_dim, dtype):
    from batchllm.attention.triton_backend import TritonBackend

    backend = TritonBackend(min_members=1, min_shared=1)  # every group attended as a group
    for seed in range(2):
        q, k, v, cache, md = random_case(specs, heads, kv_heads, head_dim, 16, dtype, seed)
        items = check_against_reference(backend, q, k, v, cache, md, head_dim ** -0.5)
        assert items.num_group_items > 0, "the prefix-shared path ran"


BLOCK64_SHARED_CASES = [  # suffix items start at the shared length: off (2000, 300) and on (1024) a tile boundary
    ("degree16-2000", group_decode(16, 2000, 200)),
    ("degree16-1024", group_decode(16, 1024, 200)),
    ("groups-prefill-and-plain", group_decode(20, 300, 7, 0) + group_decode(3, 1024, 0, 1)
     + [(0, 100), (50, 1), (2000, 33)]),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name, specs", BLOCK64_SHARED_CASES, ids=[c[0] for c in BLOCK64_SHARED_CASES])
def test_prefix_shared_attention_on_64_token_blocks_matches_reference(name, specs, dtype):
    """Prefix and suffix items on a 64-token-block cache: those starting at a multiple of the tile
    width read one block index per tile, the others gather one per key."""
    from batchllm.attention.triton_backend import TritonBackend

    q, k, v, cache, md = random_case(specs, 32, 8, 128, 64, dtype, seed=3)
    items = check_against_reference(TritonBackend(min_members=1, min_shared=1), q, k, v, cache, md, 128 ** -0.5)
    assert items.num_group_items > 0, "the prefix-shared path ran"


TMA_CASES = [  # name, specs, heads, kv heads, head dim (64-token blocks)
    ("prefill-gqa4", [(0, 1000), (0, 77), (2000, 200), (64, 64), (0, 1)], 32, 8, 128),
    ("prefill-gqa8", [(0, 700), (128, 300), (5, 40)], 64, 8, 128),
    ("prefill-d64", [(0, 900), (1000, 100)], 32, 8, 64),
    ("groups-and-decode", group_decode(8, 1024, 30) + group_decode(4, 300, 90, group=1) + [(4000, 1), (63, 1)],
     32, 8, 128),
]


@pytest.mark.parametrize("decode_tile", ["DECODE_TILE", "DECODE_TILE_TMA"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name, specs, heads, kv_heads, head_dim", TMA_CASES, ids=[c[0] for c in TMA_CASES])
def test_tma_tiles_match_reference_and_read_no_unwritten_slot(name, specs, heads, kv_heads, head_dim, dtype,
                                                              decode_tile):
    """On Hopper a 16-bit cache of 64-token blocks loads its unmasked tiles by TMA (the default,
    `TritonBackend(tma=None)`): prefill, prefix, suffix and decode items against the reference, with
    NaN in every slot no sequence holds (whole boxes are loaded only where every key is written), and
    against the same kernel without TMA; the one-query and prefix programs at the engine's tile for TMA
    tiles (DECODE_TILE_TMA) and at DECODE_TILE."""
    from batchllm.attention import triton_backend
    from batchllm.attention.triton_backend import TritonBackend

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9 (Hopper) or later")
    q, k, v, cache, md = random_case(specs, heads, kv_heads, head_dim, 64, dtype, seed=7)
    poison_unwritten_slots(cache, md)
    backend = TritonBackend(min_members=1, min_shared=1, decode_tile=getattr(triton_backend, decode_tile))
    assert backend.uses_tma(cache, head_dim)
    items = check_against_reference(backend, q, k, v, cache, md, head_dim ** -0.5)
    assert name != "groups-and-decode" or items.num_group_items > 0, "the prefix-shared path ran"
    md.backend_cache.clear()
    with_tma = backend.forward(q, k, v, cache.clone(), md, head_dim ** -0.5)
    md.backend_cache.clear()
    without = TritonBackend(min_members=1, min_shared=1, tma=False).forward(q, k, v, cache.clone(), md,
                                                                              head_dim ** -0.5)
    err = (with_tma.float() - without.float()).norm() / without.float().norm()
    assert err < 1e-2, f"TMA against pointer loads: relative difference {err:.2e}"


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_split_k_matches_reference(dtype, block_size):
    from batchllm.attention.triton_backend import TritonBackend

    specs = [(16000, 1), (3000, 1), (40, 1), (1000, 64)] + group_decode(4, 5000, 900)
    q, k, v, cache, md = random_case(specs, 32, 8, 128, block_size, dtype, seed=5)
    items = check_against_reference(TritonBackend(split_len=512), q, k, v, cache, md, 128 ** -0.5)
    assert len(items.merge_tokens) >= 4 + 4 and items.num_group_items > 0


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_engine_on_64_token_blocks_graphs_give_the_tokens_of_eager_steps(tmp_path, name):
    """The engine with `block_size=64` (prefill tiles, prefix groups, decode CUDA graphs replaying
    static plans) in float32: graphs give eager steps' greedy tokens (the same attention over the
    same cache; 64-token blocks against HF tokens: tests/unit/test_triton_interpreted.py, on the CPU)."""
    from batchllm import LLM, SamplingParams
    from tests.helpers import make_tiny_model

    model_dir = str(make_tiny_model(name, tmp_path))  # no tokenizer: the device has no default model package
    shared = list(range(10, 310))  # long enough to be attended as a group (work_items.MIN_SHARED_TOKENS)
    prompts = [{"prompt_token_ids": shared + [100 + i] * (i + 1)} for i in range(6)]
    prompts += [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 90, 700)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tokens = {}
    for eager in (True, False):
        llm = LLM(model_dir, device="cuda", dtype="float32", skip_tokenizer_init=True,
                  max_num_batched_tokens=256, block_size=64, kv_cache_memory_gib=1, enforce_eager=eager)
        tokens[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if not eager:
            assert llm.engine.runner.num_graph_steps > 0, "decode ran as CUDA graphs"
        del llm
    assert tokens[False] == tokens[True]
