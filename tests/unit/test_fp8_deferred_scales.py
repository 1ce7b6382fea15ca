"""Deferred FP8 scales (fp8_deferred_scales, issue 16), on CPU: an `Fp8Linear` that `defers_scales`
returns the unit-scaled product and its scales (`Fp8Output`) for decode-sized bfloat16 inputs, which
stand for its row-scaled output; the ops after it (TorchOps by materializing, TritonOps' kernels under the
interpreter by scaling on load) compute on that output; the decoder defers only where the next op
applies the scales; and an engine with it gives the logits of one without, within bfloat16 rounding.
On the device: tests/gpu/test_fp8_deferred_scales.py."""

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.layers.fp8 import (
    DEFERRED_SCALES_MAX_TOKENS,
    Fp8Input,
    Fp8Linear,
    Fp8Output,
    channel_quantized,
    quantize_rows,
)
from batchllm.layers.ops import TorchOps
from batchllm.layers.rotary import RotaryEmbedding
from tests.helpers import assert_ops_scale_on_load


def _layer(n: int, k: int, bias: bool = False, seed: int = 0) -> Fp8Linear:
    g = torch.Generator().manual_seed(seed)
    layer = Fp8Linear(k, n, bias=bias).to(torch.bfloat16)
    q, s = channel_quantized(torch.randn(n, k, generator=g) * 0.05, None, "channel")
    layer.weight.data, layer.weight_scale.data = q, s
    if bias:
        layer.bias.data = torch.randn(n, generator=g).to(torch.bfloat16)
    return layer


def _deferred(rows: int, cols: int, seed: int) -> Fp8Output:
    """An `Fp8Output` of a real product: bfloat16 rows of e4m3 sums, positive scales."""
    layer = _layer(cols, 64, seed=seed)
    layer.defers_scales = True
    x = (torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed + 1)) * 2).to(torch.bfloat16)
    out = layer(x)
    assert isinstance(out, Fp8Output)
    return out


@pytest.mark.parametrize("fused_input", [False, True])
def test_deferred_output_stands_for_the_row_scaled_one(fused_input):
    layer = _layer(48, 64)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    arg = Fp8Input(*quantize_rows(x), torch.bfloat16) if fused_input else x
    want = layer(arg)
    layer.defers_scales = True
    got = layer(arg)
    assert isinstance(got, Fp8Output) and got.product.dtype == torch.bfloat16
    assert got.product.shape == (9, 48) and got.x_scale.shape == (9, 1)
    assert torch.equal(got.w_scale, layer.weight_scale)
    out = got.scaled()
    assert out.dtype == torch.bfloat16
    # the product rounded to bfloat16 before the scales: at most one more rounding than the row-scaled output
    torch.testing.assert_close(out.float(), want.float(), rtol=2**-7, atol=1e-6)
    xq = arg.q if fused_input else quantize_rows(x)[0]
    unscaled = (xq.float() @ layer.weight.float().t()).to(torch.bfloat16)
    assert torch.equal(got.product, unscaled), "the product of the e4m3 values, rounded once, unscaled"


def test_a_layer_defers_only_what_the_next_op_can_scale():
    layer = _layer(48, 64)
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert isinstance(layer(x), torch.Tensor), "off unless asked"
    layer.defers_scales = True
    assert layer.defers_for(DEFERRED_SCALES_MAX_TOKENS, torch.bfloat16)
    assert not layer.defers_for(DEFERRED_SCALES_MAX_TOKENS + 1, torch.bfloat16), "prefill-sized"
    assert not layer.defers_for(4, torch.float32) and not layer.defers_for(4, torch.float16), "bfloat16 only"
    assert isinstance(layer(x.float()), torch.Tensor)
    biased = _layer(48, 64, bias=True)
    biased.defers_scales = True
    assert not biased.defers_for(4, torch.bfloat16), "a bias comes after the scales"
    ragged = _layer(40, 64)
    ragged.defers_scales = True
    assert not ragged.defers_for(4, torch.bfloat16), "N not a multiple of 16: no _scaled_mm"
    row_parallel = Fp8Linear(64, 48, bias=False, tp=object(), row_parallel=True)
    row_parallel.defers_scales = True
    assert not row_parallel.defers_for(4, torch.bfloat16), "the all-reduce sums scaled outputs"


def test_torch_ops_compute_on_the_output_a_deferred_one_stands_for():
    ops = TorchOps()
    out = _deferred(5, 96, seed=3)
    residual = torch.randn(5, 96, generator=torch.Generator().manual_seed(4))
    weight = torch.randn(96, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    got, summed = ops.add_rms_norm(out, residual.clone(), weight, 1e-5)
    want, want_sum = ops.add_rms_norm(out.scaled(), residual.clone(), weight, 1e-5)
    assert torch.equal(got, want) and torch.equal(summed, want_sum)
    gate_up = _deferred(5, 160, seed=6)
    assert torch.equal(ops.silu_and_mul(gate_up), ops.silu_and_mul(gate_up.scaled()))


def _rotations(heads: int, n: int):
    from batchllm.layers.triton_ops import TritonOps

    table = RotaryEmbedding(32, 512, 10000.0, None)
    positions = torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(7))
    args = (table.cos, table.sin_signed, positions, torch.bfloat16)
    return TorchOps().step_rotary(*args), TritonOps().step_rotary(*args)


def test_triton_ops_scale_on_load_as_the_materialized_output():
    """Scaling on load is `Fp8Output.scaled()`'s arithmetic: the kernels give the bits they give
    on the materialized output (norm, with and without quantizing; SiLU; rotation of q and k, v
    only scaled), and the rotation matches torch's."""
    from batchllm.layers.triton_ops import TritonOps

    heads, rotated, n = 20, 16, 6  # 12 q heads, 4 k heads, 4 v heads of 32: v in the second 16-head program
    torch_rotary, triton_rotary = _rotations(heads, n)
    qkv = _deferred(n, heads * 32, seed=12)
    got = assert_ops_scale_on_load(
        TritonOps(), _deferred(n, 96, seed=8), torch.randn(n, 96, generator=torch.Generator().manual_seed(9)),
        torch.randn(96, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16), _deferred(n, 160, seed=11),
        qkv, triton_rotary, rotated, 32)
    torch.testing.assert_close(got, torch_rotary.scale_and_rotate(qkv, rotated, 32))


def _logits(model_dir, defer: bool, ops: str):
    llm = LLM(model_dir, device="cpu", dtype="bfloat16", quantization="fp8", skip_tokenizer_init=True,
              max_num_batched_tokens=32)
    model = llm.engine.model
    if ops == "triton":  # the GPU's kernels, interpreted
        from batchllm.layers.triton_ops import TritonOps

        model.use_ops(TritonOps())
    model.match_deferred_scales(defer)
    deferred = []
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.register_forward_hook(
                lambda m, a, out: deferred.append(m) if isinstance(out, Fp8Output) else None)
    hidden = []
    model.model.norm.register_forward_hook(lambda m, a, out: hidden.append(out[0].clone()))
    shared = list(range(100, 140))
    prompts = [shared + [7 + i, 300 + i] for i in range(3)] + [list(range(500, 520))]
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    with torch.no_grad():  # the first step's: prompt tokens only, the same inputs with and without
        logits = model.compute_logits(hidden[0]).float()
    return [o.outputs[0].token_ids for o in outs], logits, set(map(id, deferred)), model


@pytest.mark.parametrize("ops", ["torch", "triton"])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_engine_with_deferred_scales_gives_the_logits_within_bf16_rounding(tiny_model_factory, name, ops):
    """Prefill chunks, a shared prefix and decode on CPU (TorchOps materialize, TritonOps scale on load,
    interpreted): every FP8 layer
    defers (not Qwen3's qkv_proj: its q/k norms come before the rotation), and the first step's logits
    stay within a bfloat16 rounding's reach of the row-scaled run's. That reach is wide on these
    random bf16 models: one extra rounding of each matmul's output (what deferring adds) moved them
    3-7% (relative L2) for each layer kind alone, 5.6% (Qwen3) and 7.6% (Llama) for all, the same
    with either ops; a scale misapplied moves them by their whole size. (Greedy tokens are not
    compared: these logits are flat enough that such noise flips first tokens.)"""
    model_dir = tiny_model_factory(name)
    _, plain, none, _ = _logits(model_dir, False, ops)
    _, logits, deferred, model = _logits(model_dir, True, ops)
    assert not none
    layer = model.model.layers[0]
    expected = {layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj}
    if name == "llama":
        expected.add(layer.self_attn.qkv_proj)
    assert {id(m) for m in expected} <= deferred
    assert (id(layer.self_attn.qkv_proj) in deferred) == (name == "llama")
    rel = float((logits - plain).norm() / plain.norm())
    print(f"{name}, {ops} ops: deferred scales moved the first step's logits by {rel:.4f} (relative L2)")
    assert 0 < rel < 0.12, f"{name}: deferred scales moved the logits by {rel:.4f} (relative L2)"


def test_the_setting_defers_only_where_the_ops_scale_on_load(tiny_model_factory):
    """fp8_deferred_scales pays only with ops that apply the scales as they load (TritonOps); with
    TorchOps, which would materialize the output, the layers keep the row-scaled product, also after
    the model switches ops (`use_ops`) back and forth."""
    from batchllm.layers.triton_ops import TritonOps

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="bfloat16", quantization="fp8",
              skip_tokenizer_init=True)
    model = llm.engine.model
    down = model.model.layers[0].mlp.down_proj
    assert not model.fp8_deferred_scales and not down.defers_scales, "CPU: no _scaled_mm, off"
    model.fp8_deferred_scales = True  # as `prepare_fp8` sets it where _scaled_mm runs
    model.match_deferred_scales()
    assert not down.defers_scales, "TorchOps would only add a pass"
    model.use_ops(TritonOps())
    assert down.defers_scales and model.model.layers[-1].self_attn.qkv_proj.defers_scales
    model.use_ops(TorchOps())
    assert not down.defers_scales
