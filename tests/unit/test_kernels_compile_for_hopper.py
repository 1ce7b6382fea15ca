"""The Triton attention kernel (and the elementwise kernels) compiled for sm_90 (H100/H200) on this
machine, no GPU: variants the interpreter cannot vouch for build, fit the shared memory, and get the
instructions they are for."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

H200_SHARED_BYTES = 232448


def compile_report(*variants: str) -> dict[str, dict]:
    script = Path(__file__).resolve().parent.parent / "sm90_compile.py"
    run = subprocess.run([sys.executable, str(script), *variants], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {row["variant"]: row for row in rows}


def test_attention_variants_compile_for_hopper_with_the_intended_instructions():
    report = compile_report()
    assert all(row["shared_bytes"] <= H200_SHARED_BYTES for row in report.values())
    # compiled as launched: loads pipelined (but float32's single-stage head-dim-256 tiles)
    assert all(row["async_copies"] > 0 for row in report.values() if not row["variant"].startswith("fp32-"))
    for name in ("fp8-dots-prefill-bf16-d128", "fp8-dots-prefix-fp32-d16"):  # the tiny models' head dim 16 too
        assert report[name]["fp8_dots"] and report[name]["e4m3_mma"], name
        assert report[name]["e4m3_to_f16_casts"] == 0, name  # the cache's values go to the MMA as they are
    fp16 = report["fp16-dots-decode-bf16-d128"]  # 16-row programs keep fp16 dots over the fp8 cache
    assert not fp16["fp8_dots"] and not fp16["e4m3_mma"] and fp16["e4m3_to_f16_casts"] > 0
    assert report["fp8-dots-tile128-prefix-bf16-d128"]["e4m3_mma"]
    assert report["fp8-cache-tile128-decode-bf16-d128"]["e4m3_to_f16_casts"] > 0
    # an fp8 cache of 64-token blocks keeps V keys-major: the aligned path's V operand leaves shared
    # memory in whole words (what remains is the per-key path for items off a tile boundary)
    head_major = report["fp8-cache-block64-decode-bf16-d128"]["shared_byte_loads"]
    assert report["fp8-cache-vt-block64-decode-bf16-d128"]["shared_byte_loads"] * 2 < head_major
    plain = report["bf16-cache-decode-d128"]
    assert not plain["e4m3_mma"] and plain["e4m3_to_f16_casts"] == 0
    # a bf16 cache of 64-token blocks: the unmasked tiles' K and V come by TMA (the masked tiles, which
    # may hold unwritten keys, keep masked pointer loads: async copies remain)
    for name in ("bf16-cache-tma-block64-prefill-d128", "bf16-cache-tma-block64-decode-d128",
                 "bf16-cache-tma-block64-prefix-d128"):
        assert report[name]["tma_loads"] > 0, name
    assert plain["tma_loads"] == 0
    # an fp8 cache of 64-token blocks by TMA: cast up, or with FP8 dots straight from shared memory
    for name in ("fp8-cache-tma-vt-block64-prefill-bf16-d128", "fp8-cache-tma-vt-block64-decode-bf16-d128",
                 "fp8-dots-tma-vt-block64-prefill-bf16-d128"):
        assert report[name]["tma_loads"] > 0, name
    dots = report["fp8-dots-tma-vt-block64-prefill-bf16-d128"]
    assert dots["e4m3_mma"] and dots["e4m3_to_f16_casts"] == 0 and dots["shared_byte_loads"] == 0


def test_seeded_noise_kernel_compiles_for_hopper_with_unsigned_32_bit_arithmetic():
    row = compile_report("seeded-noise")["seeded-noise"]
    assert row["logical_shifts"] > 0 and row["arithmetic_shifts"] == 0  # the hash's shifts bring in zeros
    assert row["products_32"] >= 4  # its products wrap at 32 bits (two per mix), as the host form's uint32 do


def test_elementwise_kernels_compile_for_hopper_in_every_form_the_engine_launches():
    """RMSNorm, SiLU-and-mul and rotary, plain / quantizing / scaling on load (deferred FP8 scales)."""
    built = compile_report("elementwise")["elementwise"]["built"]
    assert len(built) == 10 and "rotary-scaled1" in built and "norm-scaled1-quant1" in built


def test_head_dim_256_launches_are_the_variants_compiled_above():
    """Head dim 256 in bf16 asked 288 KiB of shared memory (SMALL_PREFILL_LAUNCH, DECODE_TILE's 64-row prefix
    programs): the engine could not start on an H200. The launches it now takes are the d256 variants of
    tests/sm90_compile.py, which fit (test above)."""
    import torch

    from batchllm.attention import triton_backend as tb
    from tests.sm90_compile import VARIANTS

    fp8 = torch.float8_e4m3fn
    for qdt, name, dtype in (("bf16", "bf16-cache-tma-block64-prefill-d256", torch.bfloat16),
                             ("fp32", "fp32-cache-prefill-d256", torch.float32)):
        rows, block_n, warps, stages = tb.prefill_launch_for_rows(dtype.itemsize, 256, tb.PREFILL_LAUNCH)
        variant = VARIANTS[name]
        assert (variant[0], variant[6] * variant[4], *variant[7:10]) == (qdt, rows, block_n, warps, stages)
        for kv_dtype, block_size in ((dtype, 64), (fp8, 16), (fp8, 128)):
            tile = tb.decode_tile_for(kv_dtype, block_size, dtype, 256, tma=True)
            assert (tile.block_n, tile.num_warps, tile.num_stages) == tuple(variant[7:10])
    assert tb.prefill_launch_for_rows(2, 128, tb.PREFILL_LAUNCH) == tb.PREFILL_LAUNCH
    assert tb.decode_tile_for(torch.bfloat16, 64, torch.bfloat16, 128, tma=True) == tb.DECODE_TILE_TMA
