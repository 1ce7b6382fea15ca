"""FP8 activations quantized inside the op before each FP8 layer (fp8_fused_quant, issue 16), on CPU:
TorchOps' `quantize=True` outputs are `quantize_rows` of the unquantized outputs, an `Fp8Linear` given
such an `Fp8Input` computes what it computes from the plain tensor, `takes_quantized` is on only with
the opt-in and a matching quantizer, and an engine with the opt-in gives the same tokens and logits
as without it. The Triton kernels' QUANT variants: tests/unit/test_triton_interpreted.py (interpreter)
and tests/gpu/test_fp8_fused_quant.py (bit identity on the device)."""

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.layers.fp8 import FP8, Fp8Input, Fp8Linear, channel_quantized, match_fused_quant, quantize_rows
from batchllm.layers.ops import TorchOps

DTYPES = [torch.float32, torch.bfloat16]


def _same_quantized(got: Fp8Input, unquantized: torch.Tensor) -> None:
    q, scale = quantize_rows(unquantized.reshape(-1, unquantized.shape[-1]))
    assert isinstance(got, Fp8Input) and got.q.dtype == FP8 and got.dtype == unquantized.dtype
    assert torch.equal(got.scale, scale) and torch.equal(got.q.view(torch.uint8), q.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_ops_quantize_their_outputs_as_the_fp8_layer_would(dtype):
    g = torch.Generator().manual_seed(0)
    x, residual = torch.randn(2, 5, 96, generator=g).to(dtype), torch.randn(2, 5, 96, generator=g)
    x[0, 1] = 0
    residual[0, 1] = 0  # an all-zero row: the floor scale
    weight = torch.randn(96, generator=g).to(dtype)
    ops = TorchOps()
    _same_quantized(ops.rms_norm(x, weight, 1e-5, quantize=True), ops.rms_norm(x, weight, 1e-5))
    got, summed = ops.add_rms_norm(x, residual, weight, 1e-5, quantize=True)
    want, want_sum = ops.add_rms_norm(x, residual, weight, 1e-5)
    _same_quantized(got, want)
    assert torch.equal(summed, want_sum)
    gate_up = torch.randn(7, 2 * 80, generator=g).to(dtype) * 4
    _same_quantized(ops.silu_and_mul(gate_up, quantize=True), ops.silu_and_mul(gate_up))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_linear_takes_a_quantized_input_as_the_plain_one(dtype):
    g = torch.Generator().manual_seed(1)
    layer = Fp8Linear(64, 48, bias=True).to(dtype)
    q, s = channel_quantized(torch.randn(48, 64, generator=g), None, "channel")
    layer.weight.data, layer.weight_scale.data = q, s
    layer.bias.data = torch.randn(48, generator=g).to(dtype)
    x = torch.randn(9, 64, generator=g).to(dtype)
    fused = layer(Fp8Input(*quantize_rows(x), dtype))
    assert fused.dtype == dtype and torch.equal(fused, layer(x))


class _OtherQuantizerOps(TorchOps):
    def fused_quantizer(self):
        return lambda x: quantize_rows(x)  # the same arithmetic, but not the layers' function


def test_takes_quantized_needs_the_opt_in_and_the_layers_quantizer():
    model = torch.nn.Sequential(Fp8Linear(16, 16, bias=False), Fp8Linear(16, 16, bias=False))
    match_fused_quant(model, TorchOps())
    assert not any(m.takes_quantized for m in model), "off without the opt-in"
    for m in model:
        m.fuse_quant = True
    match_fused_quant(model, _OtherQuantizerOps())
    assert not any(m.takes_quantized for m in model), "off where the ops' quantizer is not the layers'"
    match_fused_quant(model, TorchOps())
    assert all(m.takes_quantized for m in model)


def _run(model_dir, dtype, fused):
    llm = LLM(model_dir, device="cpu", dtype=dtype, quantization="fp8", fp8_fused_quant=fused,
              skip_tokenizer_init=True, max_num_batched_tokens=32)
    calls = []
    for module in llm.engine.model.modules():  # count the layers' own quantizer calls, by layer kind
        if isinstance(module, Fp8Linear):
            module.quantize = (lambda f, n: lambda x: calls.append(n) or f(x))(module.quantize, module.weight.shape)
    hidden = []
    hook = llm.engine.model.model.norm.register_forward_hook(lambda m, a, out: hidden.append(out[0].clone()))
    shared = list(range(100, 140))
    prompts = [shared + [7 + i, 300 + i] for i in range(3)] + [list(range(500, 520))]
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    hook.remove()
    with torch.no_grad():
        logits = llm.engine.model.compute_logits(torch.cat(hidden))
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], logits, set(calls), llm


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_gives_the_same_tokens_and_logits_with_the_opt_in(tiny_model_factory, dtype):
    """Prefill chunks, a shared prefix and decode: identical greedy tokens, logprobs and logits (the
    same bits: TorchOps' fused output is the layer's own quantization); with the opt-in only o_proj
    (after attention, not a norm or SiLU) still quantizes its own input."""
    model_dir = tiny_model_factory("llama")
    plain, plain_logits, plain_calls, _ = _run(model_dir, dtype, False)
    fused, fused_logits, fused_calls, llm = _run(model_dir, dtype, True)
    layer = llm.engine.model.model.layers[0]
    assert layer.self_attn.qkv_proj.takes_quantized and layer.mlp.gate_up_proj.takes_quantized
    assert layer.mlp.down_proj.takes_quantized
    o_proj = tuple(layer.self_attn.o_proj.weight.shape)
    assert len(plain_calls) == 4 and fused_calls == {o_proj}, "the fused path ran"
    assert fused == plain
    assert torch.equal(fused_logits, plain_logits)
