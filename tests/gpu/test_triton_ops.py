"""Triton norm, rotary and SiLU kernels against the torch ops (transformers' arithmetic) on the GPU,
in the 16-bit dtypes and at the Llama-3.1-8B widths."""

import pytest
import torch

from batchllm.layers.ops import TorchOps
from batchllm.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]


def triton_ops():
    from batchllm.layers.triton_ops import TritonOps

    return TritonOps()


def ulp_mismatch_fraction(a, b):
    """Share of elements that differ at all (both are rounded to the same 16-bit type)."""
    return (a != b).float().mean().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 37, 8192])
def test_add_rms_norm(rows, dtype):
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 4096, generator=g, device="cuda").to(dtype)
    residual = torch.randn(rows, 4096, generator=g, device="cuda").to(dtype)
    weight = (1 + 0.1 * torch.randn(4096, generator=g, device="cuda")).to(dtype)
    want_out, want_sum = TorchOps().add_rms_norm(x, residual, weight, 1e-5)
    out, summed = triton_ops().add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    assert torch.equal(summed, want_sum), "the residual sum is rounded as torch rounds it"
    torch.testing.assert_close(out, want_out, rtol=1e-2, atol=1e-2)
    assert ulp_mismatch_fraction(out, want_out) < 0.01  # only the order of the sum of squares differs
    plain = triton_ops().rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(plain, TorchOps().rms_norm(x, weight, 1e-5), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 300])
def test_silu_and_mul(rows, dtype):
    g = torch.Generator(device="cuda").manual_seed(rows)
    gate_up = (3 * torch.randn(rows, 2 * 14336, generator=g, device="cuda")).to(dtype)
    got, want = triton_ops().silu_and_mul(gate_up), TorchOps().silu_and_mul(gate_up)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    assert ulp_mismatch_fraction(got, want) < 0.001  # exp may differ by an ulp in float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}])
def test_rotary_in_place_matches_torch(dtype, scaling):
    n, heads, kv_heads, head_dim = 500, 32, 8, 128
    table = RotaryEmbedding(head_dim, 20000, 500000.0, scaling).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g, device="cuda").to(dtype)
    positions = torch.randint(0, 20000, (n,), generator=g, device="cuda")
    qk = qkv[:, :(heads + kv_heads) * head_dim].view(n, heads + kv_heads, head_dim)
    exact = TorchOps().step_rotary(table.cos, table.sin_signed, positions, torch.float32)(qk.float())
    want = TorchOps().step_rotary(table.cos, table.sin_signed, positions, dtype)(qk)
    got = triton_ops().step_rotary(table.cos, table.sin_signed, positions, dtype)(qk)
    assert got.data_ptr() == qk.data_ptr(), "in place"
    # as accurate as torch's own 16-bit arithmetic, against the float32 rotation of the same inputs
    torch_err, triton_err = (want.float() - exact).abs(), (got.float() - exact).abs()
    assert triton_err.max() <= 1.5 * torch_err.max() and triton_err.mean() <= 1.5 * torch_err.mean(), (
        f"max {triton_err.max():.3g} vs torch {torch_err.max():.3g}; mean {triton_err.mean():.3g} vs "
        f"{torch_err.mean():.3g}; {100 * ulp_mismatch_fraction(got, want):.1f}% of elements differ from torch's")


def test_seeded_noise_kernel_gives_the_host_noise_and_the_host_tokens():
    """The compiled kernel (`seeded_noise_triton`) hashes as the host's numpy form does, at real
    vocabulary sizes and seeds of every range (float32 `log` may round apart), and it is what
    `seeded_exponential` runs on CUDA; so a seeded row samples the same token on the GPU as on the
    CPU from the same logits, and rows of one distribution draw apart by their seeds alone."""
    import numpy as np

    from batchllm.layers.sampler import sample_on_device
    from batchllm.layers.seeded_noise import row_keys, seeded_exponential, seeded_exponential_host
    from batchllm.layers.seeded_noise_triton import seeded_exponential_triton
    from batchllm.outputs import SamplingSpec

    seeds = list(range(-3, 61)) + [2**64 - 1, 2**40, -(2**63)]
    positions = [17 * i for i in range(len(seeds))]
    keys = row_keys(seeds, positions)
    for vocab in (1, 1000, 49152, 151936):
        kernel = seeded_exponential_triton(torch.from_numpy(keys.astype(np.int64)).cuda(), vocab)
        torch.testing.assert_close(kernel.cpu(), seeded_exponential_host(keys, vocab), rtol=1e-5, atol=1e-6)
        assert torch.equal(seeded_exponential(seeds, positions, vocab, torch.device("cuda")), kernel)

    torch.manual_seed(0)
    logits = (torch.randn(1, 49152) * 3).expand(len(seeds), -1).contiguous()  # one distribution for every row
    specs = [SamplingSpec(temperature=0.8, top_k=0, top_p=0.95, min_p=0.0, seed=s, num_logprobs=None) for s in seeds]
    cpu_tokens = sample_on_device(logits, specs, positions, torch.Generator()).lists()[0]
    gpu_tokens = sample_on_device(logits.cuda(), specs, positions, torch.Generator("cuda")).lists()[0]
    assert sum(a != b for a, b in zip(cpu_tokens, gpu_tokens)) <= 1  # (a near-tie may round apart)
    assert len(set(gpu_tokens)) > 4  # the same distribution, drawn apart by the seeds
