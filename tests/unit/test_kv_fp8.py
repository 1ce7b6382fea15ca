"""The FP8 KV cache on CPU: the option, the quantized store and read, the pool's byte arithmetic,
checkpoint scales, and the torch reference attention over an fp8 cache."""

from __future__ import annotations

import argparse

import pytest
import torch

from batchllm.attention.backend import store_kv
from batchllm.attention.kv_quant import KV_CACHE_DTYPES, layer_caches, quantize_cache, read_slots
from batchllm.attention.torch_ref import TorchReferenceBackend
from batchllm.config import _KV_CACHE_DTYPES, CacheConfig
from batchllm.layers.fp8 import FP8, FP8_MAX, dequantize, quantize
from batchllm.options import add_engine_arguments, engine_config, engine_kwargs_from_args
from batchllm.runner.model_runner import plan_kv_cache
from tests.attention_cases import group_decode, random_case


def dequantized(cache: torch.Tensor, kv_scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.stack([dequantize(cache[0], kv_scale[0], dtype), dequantize(cache[1], kv_scale[1], dtype)])


def test_option_declared_once_with_its_choices_and_a_clear_error():
    # config.py imports no torch, so it declares the choices itself: they must be kv_quant's keys, in order
    assert tuple(KV_CACHE_DTYPES) == _KV_CACHE_DTYPES
    assert CacheConfig.__dataclass_fields__["kv_cache_dtype"].metadata["choices"] == _KV_CACHE_DTYPES
    assert engine_config(kv_cache_dtype="fp8").cache.kv_cache_dtype == "fp8"
    assert engine_config().cache.kv_cache_dtype == "auto"
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \('auto', 'fp8', 'fp8_e4m3', 'bfloat16', "
                                         r"'float16'\), got 'int8'"):
        engine_config(kv_cache_dtype="int8")
    # None: the model's dtype
    assert KV_CACHE_DTYPES == {"auto": None, "fp8": FP8, "fp8_e4m3": FP8, "bfloat16": None, "float16": None}
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_kwargs_from_args(parser.parse_args(["--kv-cache-dtype", "fp8"]))["kv_cache_dtype"] == "fp8"
    with pytest.raises(SystemExit):  # argparse refuses what is not a choice
        parser.parse_args(["--kv-cache-dtype", "int8"])


def test_fp8_e5m2_is_refused_by_name_at_construction():
    """vLLM takes kv_cache_dtype='fp8_e5m2'; the cache here is e4m3 only (its kernels are built for it), and the
    refusal said only 'must be one of': it now names e5m2 as unsupported and the values to give instead, before any
    model loads (the config is checked when the LLM is built)."""
    from batchllm import LLM

    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8_e5m2' is not supported: the fp8 KV cache here stores "
                                         r"float8_e4m3fn only .*give 'fp8' \(= 'fp8_e4m3'\)"):
        engine_config(kv_cache_dtype="fp8_e5m2")
    with pytest.raises(ValueError, match="fp8_e5m2"):
        LLM("/nonexistent/model", kv_cache_dtype="fp8_e5m2")
    assert engine_config(kv_cache_dtype="fp8_e4m3").cache.kv_cache_dtype == "fp8_e4m3"


@pytest.mark.parametrize("command", ["run", "bench", "engine_args"])
def test_fp8_e5m2_is_refused_by_name_on_the_command_line_too(command, capsys):
    """The flag's choices come from the option, so argparse refused fp8_e5m2 with only 'invalid choice' before the
    config's reason could be given; every command line now says the config's reason."""
    from batchllm.cli import build_parser
    from batchllm.engine_args import EngineArgs

    if command == "engine_args":
        parser, words = EngineArgs.add_cli_args(argparse.ArgumentParser()), []
    else:
        parser, words = build_parser(), [command] + (["in.jsonl", "-o", "out.jsonl"] if command == "run" else [])
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(words + ["--kv-cache-dtype", "fp8_e5m2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "kv_cache_dtype='fp8_e5m2' is not supported: the fp8 KV cache here stores float8_e4m3fn only" in err
    assert parser.parse_args(words + ["--kv-cache-dtype", "fp8"]).kv_cache_dtype == "fp8"


def test_quantize_round_trip_is_within_e4m3_precision_and_clamps():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4096, generator=g) * 3, torch.randn(64, generator=g) * 2.0**-10])  # + subnormals
    scale = torch.tensor(0.25)
    q = quantize(x, scale)
    assert q.dtype == FP8
    back = dequantize(q, scale, torch.float32)
    normal = (x / scale).abs() >= 2.0**-6  # e4m3's normal range: 3 mantissa bits, relative error <= 2^-4
    rel = ((back - x).abs() / x.abs())[normal]
    assert rel.max() <= 2.0**-4 + 1e-6
    assert (back - x)[~normal].abs().max() <= 2.0**-10 * scale  # subnormals: absolute error <= half a step
    assert torch.equal(q.view(torch.uint8), (x / scale).to(FP8).view(torch.uint8)), "x / scale, cast"
    big = torch.tensor([1e4, -1e4, 500.0 * 0.25])
    assert dequantize(quantize(big, scale), scale, torch.float32).tolist() == [FP8_MAX * 0.25, -FP8_MAX * 0.25, 112.0]
    assert torch.equal(dequantize(quantize(x * 100, None), None, torch.float32),
                       (x * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8).float())


def test_store_kv_quantizes_into_its_slots_only_and_reads_back_dequantized():
    g = torch.Generator().manual_seed(1)
    blocks, bs, kvh, d = 4, 4, 2, 8
    cache = torch.zeros(2, blocks, bs, kvh, d, dtype=torch.uint8).view(FP8)
    key, value = torch.randn(3, kvh, d, generator=g), torch.randn(3, kvh, d, generator=g)
    slots = torch.tensor([13, 2, 7])
    kv_scale = torch.tensor([0.5, 2.0])
    store_kv(key, value, cache, slots, kv_scale)
    flat_k, flat_v = cache[0].view(-1, kvh, d), cache[1].view(-1, kvh, d)
    assert torch.equal(flat_k[slots].view(torch.uint8), quantize(key, kv_scale[0]).view(torch.uint8))
    assert torch.equal(flat_v[slots].view(torch.uint8), quantize(value, kv_scale[1]).view(torch.uint8))
    others = torch.ones(blocks * bs, dtype=torch.bool)
    others[slots] = False
    assert not cache.view(torch.uint8).reshape(2, -1, kvh, d)[:, others].any(), "other slots untouched"
    keys, values = layer_caches(cache)
    got_k = read_slots(keys, slots, torch.bfloat16, kv_scale[0])
    assert got_k.dtype == torch.bfloat16
    torch.testing.assert_close(got_k.float(), key, rtol=2.0**-4, atol=2.0**-9)
    torch.testing.assert_close(read_slots(values, slots, torch.float32, kv_scale[1]), value, rtol=2.0**-4, atol=2.0**-7)


def test_fp8_cache_of_64_token_blocks_keeps_v_keys_major():
    """Blocks of whole 64-key tiles: each block's V bytes are [kv_heads, head_dim, block_size] (keys
    contiguous), K's [block_size, kv_heads, head_dim]; `layer_caches` indexes both as [block, slot,
    head, dim], and the store and read go through it. 16-token blocks and 16-bit caches keep V as K."""
    from batchllm.attention.kv_quant import values_keys_major

    g = torch.Generator().manual_seed(2)
    blocks, bs, kvh, d = 3, 64, 2, 8
    cache = torch.zeros(2, blocks, bs, kvh, d, dtype=torch.uint8).view(FP8)
    assert values_keys_major(cache)
    assert not values_keys_major(cache[:, :, :16]) and not values_keys_major(torch.zeros(2, 1, 64, 1, 8))
    key, value = torch.randn(5, kvh, d, generator=g), torch.randn(5, kvh, d, generator=g)
    slots = torch.tensor([0, 63, 64, 130, 191])
    store_kv(key, value, cache, slots, None)
    raw_v = cache[1].view(torch.uint8).view(blocks, kvh, d, bs)  # the bytes as laid out
    want_v = quantize(value, None).view(torch.uint8)
    for i, slot in enumerate(slots.tolist()):
        assert torch.equal(raw_v[slot // bs, :, :, slot % bs], want_v[i])
    assert torch.equal(cache[0].view(torch.uint8).view(-1, kvh, d)[slots], quantize(key, None).view(torch.uint8))
    assert int((raw_v != 0).sum()) == int((want_v != 0).sum()), "no other V byte written"
    keys, values = layer_caches(cache)
    assert values.shape == keys.shape == (blocks, bs, kvh, d)
    assert torch.equal(read_slots(values, slots, torch.float32, None), quantize(value, None).float())


def test_kv_pool_bytes_per_block_use_one_byte_per_element(tiny_model_factory):
    from pathlib import Path

    from batchllm.models.spec import read_model_spec

    spec = read_model_spec(Path(tiny_model_factory("llama")))
    cpu = torch.device("cpu")
    plans = {(dtype, kv): plan_kv_cache(spec, CacheConfig(kv_cache_memory_gib=0.5, kv_cache_dtype=kv, block_size=16),
                                        dtype, cpu)
             for dtype in (torch.float32, torch.bfloat16) for kv in ("auto", "fp8")}
    per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim  # K and V elements per token
    for (dtype, kv), plan in plans.items():
        element = 1 if kv == "fp8" else torch.empty(0, dtype=dtype).element_size()
        assert plan.dtype == (FP8 if kv == "fp8" else dtype)
        assert plan.bytes_per_block == per_token * 16 * element
        assert plan.num_blocks == 2**29 // plan.bytes_per_block
        assert plan.num_bytes == plan.num_blocks * plan.bytes_per_block <= 2**29
    # 0.5 GiB divides evenly here: exactly 2x the blocks of a bf16 cache, 4x those of a float32 one
    assert plans[torch.bfloat16, "fp8"].num_blocks == 2 * plans[torch.bfloat16, "auto"].num_blocks
    assert plans[torch.float32, "fp8"].num_blocks == 4 * plans[torch.float32, "auto"].num_blocks
    assert plans[torch.float32, "fp8"] == plans[torch.bfloat16, "fp8"]


def test_block_size_left_open_is_64_for_an_fp8_cache_and_16_otherwise(tiny_model_factory):
    """An fp8 cache's blocks hold whole 64-key tiles (its V keys-major) unless the user names a size."""
    from pathlib import Path

    from batchllm.attention.kv_quant import KEYS_MAJOR_BLOCK
    from batchllm.models.spec import read_model_spec

    spec = read_model_spec(Path(tiny_model_factory("llama")))
    cpu = torch.device("cpu")

    def block_size(**options):
        return plan_kv_cache(spec, CacheConfig(kv_cache_memory_gib=0.5, **options), torch.bfloat16, cpu).block_size

    assert engine_config().cache.block_size is None
    assert block_size(kv_cache_dtype="fp8") == KEYS_MAJOR_BLOCK == 64
    assert block_size() == block_size(kv_cache_dtype="auto") == 16
    assert block_size(kv_cache_dtype="fp8", block_size=16) == 16 and block_size(block_size=32) == 32


def test_block_size_left_open_is_64_where_tiles_load_by_tma(monkeypatch):
    """A 16-bit cache takes 64-token blocks where its attention tiles can load by TMA (a Hopper GPU, a
    head dim the dot takes unpadded); 16 elsewhere (asked of the rule itself: this machine has no GPU)."""
    from batchllm.attention import triton_backend
    from batchllm.runner import model_runner

    cuda = torch.device("cuda")
    monkeypatch.setattr(triton_backend, "tma_available", lambda device: device.type == "cuda")
    assert model_runner.default_block_size(torch.bfloat16, cuda, 128) == 64
    assert model_runner.default_block_size(torch.float16, cuda, 64) == 64
    assert model_runner.default_block_size(torch.bfloat16, cuda, 80) == 16  # padded to 128 in the dot
    assert model_runner.default_block_size(torch.float32, cuda, 128) == 16
    assert model_runner.default_block_size(torch.bfloat16, torch.device("cpu"), 128) == 16
    monkeypatch.setattr(triton_backend, "tma_available", lambda device: False)  # before Hopper
    assert model_runner.default_block_size(torch.bfloat16, cuda, 128) == 16


REFERENCE_CASES = [
    ("decode-and-prefill", [(37, 1), (300, 1), (0, 77), (64, 40)]),
    ("groups", group_decode(6, 300, 20) + [(90, 1)]),
]


@pytest.mark.parametrize("name, specs", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_attention_over_fp8_cache_is_attention_over_its_dequantized_values(name, specs, dtype):
    q, k, v, cache, md = random_case(specs, 8, 2, 64, 16, dtype, seed=3, device="cpu")
    kv_scale = torch.tensor([0.75, 1.5])
    fp8 = quantize_cache(cache, kv_scale)
    out = TorchReferenceBackend().forward(q, k, v, fp8, md, 0.125, kv_scale)
    # the same attention over a cache in `dtype` holding what the fp8 cache holds (new tokens included:
    # stored again as the values they were quantized to)
    plain = dequantized(fp8, kv_scale, dtype)
    kq, vq = (plain[i].view(-1, *k.shape[1:])[md.slot_mapping] for i in (0, 1))
    want = TorchReferenceBackend().forward(q, kq, vq, plain, md, 0.125)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    full = TorchReferenceBackend().forward(q, k, v, cache.clone(), md, 0.125)  # no quantization at all
    err = float((out.float() - full.float()).norm() / full.float().norm())
    assert err < 0.05, f"fp8 KV attention is {err:.3f} (relative L2) from full precision"


def test_checkpoint_kv_scales_load_per_layer_and_bad_ones_are_refused(tiny_model_factory, tmp_path):
    """vLLM's `self_attn.k_scale`, AutoFP8's `k_proj.output_scale` and the older `kv_scale` (both)
    land in the FP8 model's per-layer scales (quantization='fp8': vLLM's Fp8Config gives the attention its KV-cache
    method, which loads them)."""
    import shutil

    from safetensors.torch import save_file

    from batchllm import LLM
    from batchllm.models.spec import ModelLoadError

    model_dir = tmp_path / "scaled"
    shutil.copytree(tiny_model_factory("llama"), model_dir)
    save_file({"model.layers.0.self_attn.k_scale": torch.tensor(0.5),
               "model.layers.0.self_attn.v_proj.output_scale": torch.tensor([2.0]),
               "model.layers.1.self_attn.kv_scale": torch.tensor(0.25, dtype=torch.bfloat16),
               # the queries' and probabilities' scales (compressed-tensors, Quark) failed the load: unused here
               "model.layers.0.self_attn.q_proj.output_scale": torch.tensor([3.0]),
               "model.layers.0.self_attn.prob_output_scale": torch.tensor(3.0),
               "model.layers.1.self_attn.attn.q_scale": torch.tensor(3.0)},
              str(model_dir / "zz-kv-scales.safetensors"))
    fp8 = dict(device="cpu", dtype="float32", quantization="fp8", kv_cache_dtype="fp8", skip_tokenizer_init=True,
               num_kv_blocks=64)
    llm = LLM(str(model_dir), **fp8)
    model = llm.engine.model
    assert model.kv_scales[:, :2].tolist() == [[0.5, 2.0], [0.25, 0.25]]
    save_file({"model.layers.0.self_attn.attn.v_scale": torch.tensor(4.0),  # vLLM's own name
               "model.layers.1.self_attn.qkv_proj.k_scale": torch.tensor(8.0),  # fused ModelOpt
               "model.layers.1.self_attn.v_cache.scale": torch.tensor(16.0)},
              str(model_dir / "zz-more-scales.safetensors"))
    more = LLM(str(model_dir), **fp8)
    assert more.engine.model.kv_scales[:, :2].tolist() == [[0.5, 4.0], [8.0, 16.0]]
    (model_dir / "zz-more-scales.safetensors").unlink()
    assert [layer.self_attn.kv_scale.tolist() for layer in model.model.layers] == [[0.5, 2.0], [0.25, 0.25]]
    assert model.model.layers[1].self_attn.kv_scale.data_ptr() % 16 == 0, "each layer's scales 16-byte aligned"
    out = llm.generate([{"prompt_token_ids": list(range(5, 30))}], use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) > 0
    for bad, message in (({"model.layers.0.self_attn.k_scale": torch.ones(2)}, "only per-tensor scales"),
                         ({"model.layers.0.self_attn.v_scale": torch.tensor(0.0)}, "must be finite and > 0"),
                         ({"model.layers.9.self_attn.k_scale": torch.tensor(1.0)}, "the model has 2 layers")):
        save_file(bad, str(model_dir / "zz-kv-scales.safetensors"))
        with pytest.raises(ModelLoadError, match=message):
            LLM(str(model_dir), **fp8)


def test_an_unquantized_model_leaves_its_checkpoint_kv_scales_out_as_vllm_does(tiny_model_factory, tmp_path, caplog):
    """A model that is not FP8 (no quantization_config, no quantization='fp8') loaded a checkpoint's k/v scales into
    its fp8 cache; vLLM's attention has a KV-cache method only under a quantization config, so it leaves them out
    (warning 'k_scale is not loaded') and runs on 1.0, without the 'scaling factor 1.0' warning. Bad ones are not
    read either. The same checkpoint with quantization='fp8' loads them."""
    import logging
    import shutil

    from safetensors.torch import save_file

    from batchllm import LLM

    model_dir = tmp_path / "unquantized"
    shutil.copytree(tiny_model_factory("llama"), model_dir)
    save_file({"model.layers.0.self_attn.k_scale": torch.tensor(0.5),
               "model.layers.1.self_attn.v_scale": torch.tensor(0.0)},  # never read: not refused
              str(model_dir / "zz-kv-scales.safetensors"))
    kw = dict(device="cpu", dtype="float32", kv_cache_dtype="fp8", skip_tokenizer_init=True, num_kv_blocks=64)
    with caplog.at_level(logging.WARNING, logger="batchllm"):
        llm = LLM(str(model_dir), **kw)
    assert llm.engine.model.kv_scales[:, :2].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert "2 KV-cache scales in the checkpoint (e.g. model.layers.0.self_attn.k_scale) are not loaded" in caplog.text
    assert "scaling factor 1.0" not in caplog.text
    save_file({"model.layers.0.self_attn.k_scale": torch.tensor(0.5)}, str(model_dir / "zz-kv-scales.safetensors"))
    assert LLM(str(model_dir), quantization="fp8", **kw).engine.model.kv_scales[0, :2].tolist() == [0.5, 0.5]


def test_a_layer_with_one_of_its_kv_scales_uses_it_for_both(tiny_model_factory, tmp_path, caplog):
    """A layer whose checkpoint gives only k_scale (or only v_scale) ran with 1.0 for the other; vLLM's
    `BaseKVCacheMethod.process_weights_after_loading` takes the max of the two (the missing one is its -1 sentinel),
    so both take the given one, and no layer is left on 1.0 (no 'scaling factor 1.0' warning)."""
    import logging
    import shutil

    from safetensors.torch import save_file

    from batchllm import LLM

    model_dir = tmp_path / "one-scale"
    shutil.copytree(tiny_model_factory("llama"), model_dir)
    save_file({"model.layers.0.self_attn.k_scale": torch.tensor(0.5),
               "model.layers.1.self_attn.v_proj.output_scale": torch.tensor([4.0])},
              str(model_dir / "zz-kv-scales.safetensors"))
    with caplog.at_level(logging.WARNING, logger="batchllm"):
        llm = LLM(str(model_dir), device="cpu", dtype="float32", quantization="fp8", kv_cache_dtype="fp8",
                  skip_tokenizer_init=True, num_kv_blocks=64)
    assert llm.engine.model.kv_scales[:, :2].tolist() == [[0.5, 0.5], [4.0, 4.0]]
    assert [layer.self_attn.kv_scale.tolist() for layer in llm.engine.model.model.layers] == [[0.5, 0.5], [4.0, 4.0]]
    assert "scaling factor 1.0" not in caplog.text


def test_admission_sees_the_larger_fp8_pool(tiny_model_factory):
    """The same memory: the float32 pool holds 40 blocks (half the batch's projected 80), the fp8
    pool 160, so all 8 requests run at once and the batch takes fewer steps."""
    from batchllm import LLM, SamplingParams

    model_dir = tiny_model_factory("llama")
    prompts = [{"prompt_token_ids": [1000 + 50 * i + j for j in range(30)]} for i in range(8)]  # nothing shared
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    steps = {}
    for kv in ("auto", "fp8"):
        llm = LLM(model_dir, device="cpu", dtype="float32", skip_tokenizer_init=True, block_size=4,
                  kv_cache_memory_gib=40 * 2048 / 2**30, max_num_batched_tokens=256, kv_cache_dtype=kv)
        llm.generate(prompts, params, use_tqdm=False)
        steps[kv] = llm.last_stats["num_steps"]
        assert llm.last_stats["kv_blocks"] == {"auto": 40, "fp8": 160}[kv]
    assert steps["fp8"] == 10, "one prefill step and 9 decode steps for all 8 requests together"
    assert steps["auto"] >= 2 * steps["fp8"] - 1, "two waves of 4 (measured: 20 steps)"


def test_an_fp8_model_without_kv_scales_warns_as_vllm_does(tiny_model_factory, tmp_path, caplog):
    """An FP8 model on an fp8 KV cache without k/v scales in its checkpoint ran on 1.0 scales silently; vLLM warns
    (its KV-cache method of an FP8 quantization config, `process_weights_after_loading`). No warning where the
    checkpoint has the scales, or where the model is not FP8 (vLLM's attention then has no such method)."""
    import logging
    import shutil

    from safetensors.torch import save_file

    from batchllm import LLM

    message = "Using KV cache scaling factor 1.0 for fp8_e4m3 in 2 of 2 layers"
    kw = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, num_kv_blocks=64)
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_factory("llama"), model_dir)
    for options, warned in ((dict(quantization="fp8", kv_cache_dtype="fp8"), True),
                            (dict(quantization="fp8"), False), (dict(kv_cache_dtype="fp8"), False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="batchllm"):
            LLM(str(model_dir), **kw, **options)
        assert (message in caplog.text) == warned, options
    save_file({f"model.layers.{i}.self_attn.{kind}": torch.tensor(0.5) for i in range(2) for kind in ("k_scale",
                                                                                                     "v_scale")},
              str(model_dir / "zz-kv-scales.safetensors"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="batchllm"):
        LLM(str(model_dir), **kw, quantization="fp8", kv_cache_dtype="fp8")
    assert "KV cache scaling factor" not in caplog.text
