"""FP8 arithmetic (layers/fp8.py) and the quantization_config parser (models/quant_config.py)."""

import re
from dataclasses import replace

import pytest
import torch

from batchllm.layers.fp8 import (
    FP8,
    Fp8Linear,
    channel_quantized,
    dequantize,
    dequantize_blocks,
    fp8_matmul,
    quantize_rows,
)
from batchllm.models.quant_config import Fp8Scheme, parse_quantization_config, resolve_quantization
from batchllm.models.spec import ModelLoadError

E4M3_REL = 2.0**-4
"""Half an e4m3 ulp relative to the value (3 mantissa bits): the rounding bound of a normal number."""


def test_round_trip_error_is_within_half_an_e4m3_ulp():
    torch.manual_seed(0)
    x = torch.randn(64, 512) * torch.logspace(-3, 3, 64).unsqueeze(1)  # rows of very different magnitude
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (64, 1) and scale.dtype == torch.float32
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), 448.0)), "each row's amax maps to 448"
    back = dequantize(q, scale)
    normal = x.abs() >= 2.0**-6 * scale  # e4m3's smallest normal, in the row's units
    rel = ((back - x).abs() / x.abs())[normal]
    assert rel.max() <= E4M3_REL * (1 + 1e-6)
    assert 0.01 < rel.mean() < 0.03, "a real rounding happened (mean relative error ~2^-6)"
    subnormal_err = ((back - x).abs() - 2.0**-10 * scale)[~normal]  # half the subnormal step
    assert subnormal_err.max() <= 1e-6 * scale.max()


def test_zero_rows_quantize_to_zeros():
    q, scale = quantize_rows(torch.zeros(3, 32))
    assert torch.equal(dequantize(q, scale), torch.zeros(3, 32))


def test_fp8_matmul_is_the_exact_product_of_the_quantized_operands():
    torch.manual_seed(1)
    x, w = torch.randn(7, 256), torch.randn(96, 256)
    wq, ws = channel_quantized(w, None, "channel")
    y = fp8_matmul(x, wq, ws, use_scaled_mm=False)
    xq, xs = quantize_rows(x)
    exact = (dequantize(xq, xs).double() @ dequantize(wq, ws).double().t()).float()
    torch.testing.assert_close(y, exact, rtol=1e-5, atol=1e-5)
    full = x @ w.t()
    rel = (y - full).norm() / full.norm()
    # both operands rounded to e4m3 (~2^-6 mean relative error each, errors independent): ~3% of the norm
    assert 0.005 < rel < 0.05, rel


def test_fp8_linear_keeps_the_model_dtype_and_adds_the_bias():
    torch.manual_seed(2)
    layer = Fp8Linear(64, 32, bias=True)
    w = torch.randn(32, 64)
    q, s = channel_quantized(w, None, "channel")
    layer.weight.data.copy_(q)
    layer.weight_scale.data.copy_(s)
    layer.bias.data.copy_(torch.randn(32))
    x = torch.randn(2, 5, 64)
    y = layer(x)
    assert y.shape == (2, 5, 32) and y.dtype == torch.float32
    ref = x @ w.t() + layer.bias
    assert (y - ref).norm() / ref.norm() < 0.05
    assert layer(x.bfloat16().float()).dtype == torch.float32


def test_checkpoint_scales_map_to_channel_scales_exactly():
    torch.manual_seed(3)
    w = torch.randn(40, 64)
    tensor_scale = w.abs().max() / 448
    q = (w / tensor_scale).to(FP8)
    q2, s2 = channel_quantized(q, tensor_scale.reshape(()), "tensor")
    assert torch.equal(q2.float(), q.float()) and torch.equal(s2, tensor_scale.expand(40))
    rows, row_scale = quantize_rows(w)
    q3, s3 = channel_quantized(rows, row_scale, "channel")  # a [n, 1] scale as compressed-tensors stores it
    assert torch.equal(q3.float(), rows.float()) and torch.equal(s3, row_scale.view(40))
    with pytest.raises(ValueError, match=r"tensor weight scale of shape \(40,\)"):
        channel_quantized(q, row_scale.view(40), "tensor")


def test_block_scales_are_dequantized_then_requantized_per_row():
    torch.manual_seed(4)
    n, k, b = 200, 300, 128  # ragged last blocks both ways
    w = torch.randn(n, k)
    scales = torch.empty(2, 3)
    q = torch.empty(n, k, dtype=FP8)
    for i in range(2):
        for j in range(3):
            tile = w[i * b:(i + 1) * b, j * b:(j + 1) * b]
            scales[i, j] = tile.abs().max() / 448
            q[i * b:(i + 1) * b, j * b:(j + 1) * b] = (tile / scales[i, j]).to(FP8)
    deq = dequantize_blocks(q, scales, (b, b))
    assert ((deq - w).abs() <= E4M3_REL * w.abs() + 2.0**-9 * scales.max()).all()
    q2, s2 = channel_quantized(q, scales, "block", (b, b))
    again = dequantize(q2, s2)
    # one more e4m3 rounding, relative to each element (or the row's subnormal step)
    assert ((again - deq).abs() <= E4M3_REL * deq.abs() + 2.0**-10 * s2.view(n, 1)).all()
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        dequantize_blocks(q, scales[:1], (b, b))


CT_CHANNEL = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"],
                                            "weights": {"type": "float", "num_bits": 8, "strategy": "channel",
                                                        "symmetric": True, "dynamic": False},
                                            "input_activations": {"type": "float", "num_bits": 8,
                                                                  "strategy": "token", "dynamic": True}}}}


def test_quantization_configs_parse_into_schemes():
    assert parse_quantization_config(None, "c") is None
    assert parse_quantization_config({"quant_method": "fp8", "activation_scheme": "dynamic"}, "c") == Fp8Scheme(
        True, "tensor", None, "weight_scale", False)
    block = parse_quantization_config({"quant_method": "fp8", "weight_block_size": [128, 128]}, "c")
    assert (block.weight_strategy, block.block_size, block.scale_suffix) == ("block", (128, 128), "weight_scale_inv")
    ct = parse_quantization_config(CT_CHANNEL, "c")
    assert (ct.weight_strategy, ct.static_input, ct.method) == ("channel", False, "compressed-tensors")
    static = parse_quantization_config({"quant_method": "fp8", "activation_scheme": "static"}, "c")
    assert static.static_input


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported"),
    ({"quant_method": "fp8", "activation_scheme": "weird"}, "activation_scheme 'weird'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
     "needs activation_scheme 'dynamic'"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size \\[128\\]"),
    ({**CT_CHANNEL, "config_groups": {"g": {"weights": {"type": "int", "num_bits": 8, "strategy": "channel"}}}},
     "weights of type 'int' with 8 bits"),
    ({**CT_CHANNEL, "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8, "strategy": "group"}}}},
     "strategy 'group' is not supported"),
    # malformed configs: named, not an AttributeError or a bare int() error (or a division by zero at load)
    ({**CT_CHANNEL, "config_groups": [1]}, "config_groups must be a JSON object .* got list"),
    ({**CT_CHANNEL, "config_groups": {"g": "x"}}, "config group 'g' must be a JSON object, got str"),
    ({**CT_CHANNEL, "config_groups": {"g": {"weights": "fp8"}}}, "group 'g' weights must be a JSON object"),
    ({**CT_CHANNEL, "config_groups": {"g": {**CT_CHANNEL["config_groups"]["group_0"], "input_activations": "x"}}},
     "group 'g' input_activations must be a JSON object"),
    *[({**CT_CHANNEL, "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8, "strategy": "block",
                                                            "block_structure": block}}}},
       re.escape(f"block_structure of two positive integers, got {block!r}")) for block in (["a", "b"], [0, 32], None)],
])
def test_configs_we_cannot_honour_are_refused_by_name(qc, message):
    with pytest.raises(ModelLoadError, match=message):
        parse_quantization_config(qc, "config.json")


def test_the_option_and_the_checkpoint_combine():
    assert resolve_quantization(None, None) is None
    assert resolve_quantization("fp8", None) == Fp8Scheme(checkpoint_fp8=False)
    ckpt = Fp8Scheme(True, "channel")
    assert resolve_quantization(None, ckpt) is ckpt and resolve_quantization("fp8", ckpt) is ckpt
    with pytest.raises(ValueError, match="conflicts with the checkpoint"):
        resolve_quantization("int8", ckpt)
    # vLLM's spelling of a compressed-tensors checkpoint's method is taken for one, refused for others (it ran as
    # "fp8" on one, and was refused as not a choice for the other, though vLLM scripts give it)
    compressed = Fp8Scheme(True, "channel", method="compressed-tensors")
    assert resolve_quantization("compressed-tensors", compressed) is compressed
    with pytest.raises(ValueError, match="conflicts with the checkpoint's quantization_config .*'compressed-tensors'"):
        resolve_quantization("fp8", compressed)
    with pytest.raises(ValueError, match="conflicts with the checkpoint's quantization_config .*method 'fp8'"):
        resolve_quantization("compressed-tensors", ckpt)
    with pytest.raises(ValueError, match="has no quantization_config: give 'fp8'"):
        resolve_quantization("compressed-tensors", None)


@pytest.mark.parametrize("method, expected", [("FP8", "fp8"), ("Fp8", "fp8"),
                                              ("compressed_tensors", "compressed-tensors"),
                                              ("Compressed-Tensors", "compressed-tensors")])
def test_quant_method_is_matched_as_vllm_normalises_it(method, expected):
    """quant_method "FP8" or "compressed_tensors" was refused as unsupported: vLLM lowercases it and spells the
    library's name with a dash before matching it."""
    qc = {**CT_CHANNEL, "quant_method": method} if "ompressed" in method else {"quant_method": method}
    assert parse_quantization_config(qc, "c").method == expected


def test_compression_config_is_read_when_there_is_no_quantization_config(tmp_path):
    """A compressed-tensors checkpoint whose config.json says "compression_config" ran unquantized, then failed on
    its float8 weights ('config.json has no FP8 quantization_config'): vLLM reads that key when there is no
    quantization_config, and quantization_config wins where both are given."""
    import json

    from batchllm.models.spec import read_model_spec

    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128}
    (tmp_path / "config.json").write_text(json.dumps({**base, "compression_config": CT_CHANNEL}))
    spec = read_model_spec(tmp_path)
    assert spec.quantization == parse_quantization_config(CT_CHANNEL, "c")
    assert spec.quantization.method == "compressed-tensors"
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps({**base, "compression_config": CT_CHANNEL,
                                                      "quantization_config": fp8}))
    assert read_model_spec(tmp_path).quantization.method == "fp8"


def test_errors_name_the_key_the_quantization_config_came_from(tmp_path):
    """A config.json with only "compression_config" was refused with errors saying "quantization_config", a key it
    does not have: each error now names the key the config was read from (and still "quantization_config" where
    that is the one)."""
    import json

    from batchllm.models.spec import read_model_spec

    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128}
    bad = (({"quant_method": "gptq"}, "{key} quant_method 'gptq' is not supported"),
           ("fp8", "{key} is not a JSON object"),
           ({"quant_method": "fp8", "ignored_layers": "lm_head"}, "{key} ignored_layers must be a list"),
           ({**CT_CHANNEL, "ignore": [1]}, "{key} ignore must be a list"))
    for key in ("compression_config", "quantization_config"):
        for qc, message in bad:
            (tmp_path / "config.json").write_text(json.dumps({**base, key: qc}))
            with pytest.raises(ModelLoadError, match=message.format(key=key)):
                read_model_spec(tmp_path)
        (tmp_path / "config.json").write_text(json.dumps({**base, key: CT_CHANNEL}))
        scheme = read_model_spec(tmp_path).quantization
        assert scheme.config_key == key and scheme == parse_quantization_config(CT_CHANNEL, "c")
        with pytest.raises(ValueError, match=f"conflicts with the checkpoint's {key} "):
            resolve_quantization("fp8", scheme)
        with pytest.raises(ModelLoadError, match=f"^{key} quantizes some but not all"):
            replace(scheme, ignore=("model.layers.0.self_attn.q_proj",)).quantizes(
                "model.layers.0.self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj"))


def test_the_quantization_option_is_lowercased_as_vllm_does():
    """LLM(quantization="FP8") and `-q FP8` were refused as not a choice: vLLM's ModelConfig lowercases the value
    (and only lowercases it: "compressed_tensors" stays unknown)."""
    import argparse

    from batchllm.options import add_engine_arguments, engine_config, engine_kwargs_from_args

    assert engine_config(quantization="FP8").model.quantization == "fp8"
    assert engine_config(quantization="Compressed-Tensors").model.quantization == "compressed-tensors"
    with pytest.raises(ValueError, match="quantization must be one of"):
        engine_config(quantization="compressed_tensors")
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_kwargs_from_args(parser.parse_args(["-q", "FP8"]))["quantization"] == "fp8"
    assert engine_kwargs_from_args(parser.parse_args([]))["quantization"] is None
