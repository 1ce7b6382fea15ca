"""FP8 activations quantized inside the norm and SiLU kernels (fp8_fused_quant, issue 16) on the GPU:
the fused kernels' float8 values and scales are bit for bit `quantize_rows_triton` of the unfused
kernels' outputs (at the Llama-3.1-8B widths, 16-bit dtypes), and an engine with the opt-in gives
the same tokens and logprobs as without it (CUDA graphs and eager; tensor parallel on 2 GPUs).

    python -m pytest -q tests/gpu/test_fp8_fused_quant.py     (on the device; compute capability >= 8.9)
"""

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.layers.fp8 import FP8, Fp8Input, scaled_mm_supported
from tests.gpu.test_fp8_gpu import _dummy_llama

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _needs_fp8():
    if not scaled_mm_supported(torch.device("cuda")):
        pytest.skip("the fused path is used where the Triton FP8 quantizer is: compute capability >= 8.9")


def _ops():
    from batchllm.layers.triton_ops import TritonOps

    return TritonOps()


def _assert_bits(got, unfused: torch.Tensor) -> None:
    from batchllm.layers.fp8_triton import quantize_rows_triton

    q, scale = quantize_rows_triton(unfused.reshape(-1, unfused.shape[-1]))
    assert isinstance(got, Fp8Input) and got.q.dtype == FP8 and got.dtype == unfused.dtype
    assert torch.equal(got.scale, scale), "row scales"
    differ = (got.q.view(torch.uint8) != q.view(torch.uint8)).sum().item()
    assert differ == 0, f"{differ} of {q.numel()} float8 values differ"


def _rows(rows, cols, dtype, seed, scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g, device="cuda") * scale).to(dtype)
    if rows > 2:
        x[1] = 0  # the floor scale
        x[2, 5] = 300  # an outlier sets its row's scale
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, hidden", [(1, 4096), (37, 4096), (8192, 4096), (300, 8192), (5, 1000)])
def test_fused_norms_are_the_quantizer_of_the_norms(rows, hidden, dtype):
    x, weight = _rows(rows, hidden, dtype, rows), (1 + 0.1 * _rows(1, hidden, torch.float32, 7)[0]).to(dtype)
    residual = _rows(rows, hidden, torch.float32, rows + 1)
    ops = _ops()
    _assert_bits(ops.rms_norm(x.clone(), weight, 1e-5, quantize=True), ops.rms_norm(x.clone(), weight, 1e-5))
    got, got_sum = ops.add_rms_norm(x.clone(), residual.clone(), weight, 1e-5, quantize=True)
    want, want_sum = ops.add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    _assert_bits(got, want)
    assert torch.equal(got_sum, want_sum), "the residual sum"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, cols", [(1, 14336), (37, 14336), (4096, 14336), (64, 7168), (33, 28672),
                                        (9, 40000), (5, 1000)])
def test_fused_silu_is_the_quantizer_of_the_silu(rows, cols, dtype):
    """14336: the 8B's intermediate size (7168 per rank at TP 2); 28672: the 70B's (a block of
    32768); 40000: past FUSED_QUANT_MAX_COLS, the unfused pair."""
    gate_up = _rows(rows, 2 * cols, dtype, cols, scale=3.0)
    ops = _ops()
    _assert_bits(ops.silu_and_mul(gate_up.clone(), quantize=True), ops.silu_and_mul(gate_up.clone()))


def _generate(model_dir, fused, **kw):
    llm = LLM(model_dir, load_format="dummy", device="cuda", dtype="bfloat16", skip_tokenizer_init=True,
              kv_cache_memory_gib=1, quantization="fp8", fp8_fused_quant=fused, **kw)
    try:
        shared = [1] + [(11 * j) % 31000 + 3 for j in range(64)]
        prompts = [shared + [(7 * i + 13 * j) % 31000 + 3 for j in range(5 + 3 * i)] for i in range(12)]
        prompts += [[1] + [(5 * i + 17 * j) % 31000 + 3 for j in range(20 + 9 * i)] for i in range(8)]
        sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        if kw.get("tensor_parallel_size", 1) == 1:
            layer = llm.engine.model.model.layers[0]
            assert layer.self_attn.qkv_proj.takes_quantized == fused
            assert layer.mlp.down_proj.takes_quantized == fused
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_engine_gives_the_same_tokens_and_logprobs_with_the_opt_in(tmp_path, eager):
    model_dir = _dummy_llama(tmp_path)
    fused = _generate(model_dir, True, enforce_eager=eager)
    assert fused == _generate(model_dir, False, enforce_eager=eager)


def test_tensor_parallel_engine_gives_the_same_tokens_with_the_opt_in(tmp_path):
    """Row-parallel down_proj quantizes over its rank's K slice: what each rank's SiLU produces."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    model_dir = _dummy_llama(tmp_path)
    fused = _generate(model_dir, True, tensor_parallel_size=2)
    assert fused == _generate(model_dir, False, tensor_parallel_size=2)
