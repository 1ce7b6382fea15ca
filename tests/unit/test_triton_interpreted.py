"""The Triton kernels' logic on the CPU, run by Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 where no GPU is; the interpreter is exact in float32, not in 16-bit types, so
bf16/fp16 are covered by tests/gpu on the device). Skipped where Triton is not installed."""

from __future__ import annotations

import os

import pytest
import torch

from batchllm.attention.torch_ref import TorchReferenceBackend
from batchllm.layers.ops import TorchOps
from tests.attention_cases import group_decode, random_case

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter tests: CPU-only machines (the GPU runs the compiled kernels in tests/gpu)",
)


def _triton_ops():
    from batchllm.layers.triton_ops import TritonOps

    return TritonOps()


@pytest.mark.parametrize("rows, cols", [(7, 96), (1, 64), (3, 200)])
def test_rms_norm_and_residual_add_match_torch(rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    x, residual = torch.randn(rows, cols, generator=g), torch.randn(rows, cols, generator=g)
    weight = torch.randn(cols, generator=g)
    torch.testing.assert_close(_triton_ops().rms_norm(x.clone(), weight, 1e-5), TorchOps().rms_norm(x, weight, 1e-5))
    want_out, want_sum = TorchOps().add_rms_norm(x, residual, weight, 1e-6)
    out, summed = _triton_ops().add_rms_norm(x.clone(), residual.clone(), weight, 1e-6)
    torch.testing.assert_close(summed, want_sum)
    torch.testing.assert_close(out, want_out)


def test_silu_and_mul_matches_torch():
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(5, 2 * 1500, generator=g) * 4  # two column blocks of 1024, the second partial
    torch.testing.assert_close(_triton_ops().silu_and_mul(gate_up.clone()), TorchOps().silu_and_mul(gate_up))


def test_rotary_rotates_strided_views_in_place_like_torch():
    """q and k as views into one qkv buffer (the model's layout): rotated in place, v untouched."""
    from batchllm.layers.rotary import RotaryEmbedding

    heads, kv_heads, head_dim, n = 4, 2, 32, 9
    table = RotaryEmbedding(head_dim, 512, 10000.0, None)
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g)
    positions = torch.randint(0, 512, (n,), generator=g)
    qk = qkv[:, :(heads + kv_heads) * head_dim].view(n, heads + kv_heads, head_dim)
    want = TorchOps().step_rotary(table.cos, table.sin_signed, positions, torch.float32)(qk)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    got = _triton_ops().step_rotary(table.cos, table.sin_signed, positions, torch.float32)(qk)
    assert got.data_ptr() == qk.data_ptr(), "in place"
    torch.testing.assert_close(got, want)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)


ATTENTION_CASES = [
    ("decode-and-prefill", [(37, 1), (300, 1), (0, 77), (64, 40)], {}),
    ("groups", group_decode(6, 300, 20) + [(90, 1)], dict(min_members=1, min_shared=1)),
    ("nested-groups", [(610 + j, 1, [(0, 300), (1 + j % 3, 600)]) for j in range(6)] + [(350, 1, [(0, 300)])] * 2,
     dict(min_members=1, min_shared=1)),
    ("split-k", [(1500, 1), (700, 3)] + group_decode(4, 600, 90), dict(split_len=128)),
]


@pytest.mark.parametrize("name, specs, options", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_kernel_matches_reference(name, specs, options):
    from batchllm.attention.triton_backend import TritonBackend

    q, k, v, cache, md = random_case(specs, 8, 2, 64, 16, torch.float32, seed=3, device="cpu")
    ref = TorchReferenceBackend().forward(q, k, v, cache.clone(), md, 0.125)
    out = TritonBackend(**options).forward(q, k, v, cache, md, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    [plan] = [p for key, p in md.backend_cache.items() if key[0] == "triton_items"]
    if "min_members" in options:
        assert plan.items.num_group_items > 0, "the prefix-shared path ran"
    if "split_len" in options:
        assert len(plan.items.merge_tokens) > 0, "split-K partials were merged"


@pytest.mark.parametrize("name, specs, options", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_kernel_over_fp8_cache_matches_reference(name, specs, options):
    """Every item kind (tiles, prefix and suffix items, split-K pieces and their merge) over an fp8
    cache with non-trivial scales: the reference over the same cache, dequantized (k_scale folded
    into the softmax scale and v_scale on the output give the same numbers); the new tokens are
    stored as the same bytes."""
    from batchllm.attention.triton_backend import TritonBackend
    from tests.unit.test_kv_fp8 import fp8_cache

    q, k, v, cache, md = random_case(specs, 8, 2, 64, 16, torch.float32, seed=3, device="cpu")
    kv_scale = torch.ones(4)[:2] * torch.tensor([0.75, 1.5])
    cache = fp8_cache(cache, kv_scale)
    ref_cache = cache.clone()
    ref = TorchReferenceBackend().forward(q, k, v, ref_cache, md, 0.125, kv_scale)
    out = TritonBackend(**options).forward(q, k, v, cache, md, 0.125, kv_scale)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    [plan] = [p for key, p in md.backend_cache.items() if key[0] == "triton_items"]
    if "min_members" in options:
        assert plan.items.num_group_items > 0, "the prefix-shared path ran"
    if "split_len" in options:
        assert len(plan.items.merge_tokens) > 0, "split-K partials were merged"


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_triton_path_gives_hf_greedy_tokens(tiny_model_factory, name):
    """The whole GPU path (Triton attention with prefix groups, Triton norm/rotary/SiLU) on the CPU:
    the same greedy tokens as HF transformers, through prefill chunks, shared prefixes and decode."""
    from batchllm import LLM, SamplingParams
    from batchllm.attention.triton_backend import TritonBackend
    from tests.helpers import hf_greedy

    model_dir = tiny_model_factory(name)
    llm = LLM(model_dir, device="cpu", dtype="float32", max_num_batched_tokens=32, skip_tokenizer_init=True)
    llm.engine.model.use_ops(_triton_ops())
    llm.engine.runner.backend = TritonBackend(min_members=1, min_shared=1)
    shared = list(range(100, 140))
    prompts = [shared + [7 + i, 300 + i] for i in range(4)] + [list(range(500, 520))]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert llm.last_stats["prefill_tokens_computed"] < sum(map(len, prompts)), "the prefix was shared"
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(model_dir, prompts, 6, stop_at_eos=False)
