"""Compile variants of the Triton attention kernel for an H100/H200 (sm_90) on any machine, no GPU
needed, and report what the PTX holds: `python tests/sm90_compile.py` prints one JSON line per
variant. Run in its own process (tests/unit/test_kernels_compile_for_hopper.py does): the kernels
must be built as compiled, not interpreted, functions, so TRITON_INTERPRET must be unset before
Triton is imported. Catches what the interpreter cannot: GPU-only compile limits (8-bit dots need
K >= 32), shared memory, and which MMA and conversion instructions a variant gets."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FP8_TMA_BLOCK64 = dict(BLOCK_SIZE=64, TILE_IN_BLOCK=True, V_KEYS_MAJOR=True, TMA=True)
BF16_TMA_BLOCK64 = dict(BLOCK_SIZE=64, TILE_IN_BLOCK=True, TMA=True)

# name: (q dtype, fp8 cache, fp8_attention, group, group pad, head dim, block_q, block_n, warps, stages[, the
# kernel's constants where they differ from a 16-token-block cache's: block size, TILE_IN_BLOCK, V_KEYS_MAJOR])
VARIANTS = {
    "fp8-dots-prefill-bf16-d128": ("bf16", True, True, 4, 4, 128, 64, 64, 8, 3),
    "fp8-dots-prefix-fp32-d16": ("fp32", True, True, 2, 2, 16, 32, 64, 4, 2),
    "fp16-dots-decode-bf16-d128": ("bf16", True, True, 4, 4, 128, 1, 64, 4, 2),
    "bf16-cache-decode-d128": ("bf16", False, False, 4, 4, 128, 1, 64, 4, 2),
    # DECODE_TILE_FP8 (128 keys, 4 warps, 3 stages), the engine's tile over an fp8 cache: one-query and
    # prefix (16 queries x group 4 = 64 rows) programs, with and without FP8 dots
    "fp8-cache-tile128-decode-bf16-d128": ("bf16", True, False, 4, 4, 128, 1, 128, 4, 3),
    "fp8-cache-tile128-prefix-bf16-d128": ("bf16", True, False, 4, 4, 128, 16, 128, 4, 3),
    "fp8-dots-tile128-prefix-bf16-d128": ("bf16", True, True, 4, 4, 128, 16, 128, 4, 3),
    # 64-token blocks over an fp8 cache, V head-dim-major (as on 16-token blocks) and keys-major (kv_quant.py),
    # at the engine's tile there (DECODE_TILE_TMA's 3 stages): one-query programs, and prefix programs
    "fp8-cache-block64-decode-bf16-d128": ("bf16", True, False, 4, 4, 128, 1, 64, 4, 3,
                                           dict(BLOCK_SIZE=64, TILE_IN_BLOCK=True)),
    "fp8-cache-vt-block64-decode-bf16-d128": ("bf16", True, False, 4, 4, 128, 1, 64, 4, 3,
                                              dict(BLOCK_SIZE=64, TILE_IN_BLOCK=True, V_KEYS_MAJOR=True)),
    "fp8-cache-vt-block64-prefix-bf16-d128": ("bf16", True, False, 4, 4, 128, 16, 64, 4, 3,
                                              dict(BLOCK_SIZE=64, TILE_IN_BLOCK=True, V_KEYS_MAJOR=True)),
    "fp8-dots-vt-block64-prefill-bf16-d128": ("bf16", True, True, 4, 4, 128, 64, 64, 8, 3,
                                              dict(BLOCK_SIZE=64, TILE_IN_BLOCK=True, V_KEYS_MAJOR=True)),
    # DECODE_TILE_FP8 over an fp8 cache of 128-token blocks (`decode_tile_for`: the tile lies whole in a block)
    "fp8-cache-vt-block128-decode-bf16-d128": ("bf16", True, False, 4, 4, 128, 1, 128, 4, 3,
                                               dict(BLOCK_SIZE=128, TILE_IN_BLOCK=True, V_KEYS_MAJOR=True)),
    # 64-token blocks of a bf16 cache, K and V by TMA (TMA_PREFILL_LAUNCH; DECODE_TILE_TMA's one-query and
    # prefix programs)
    "bf16-cache-tma-block64-prefill-d128": ("bf16", False, False, 4, 4, 128, 32, 64, 4, 3,
                                            dict(BLOCK_SIZE=64, TILE_IN_BLOCK=True, TMA=True)),
    "bf16-cache-tma-block64-decode-d128": ("bf16", False, False, 4, 4, 128, 1, 64, 4, 3,
                                           dict(BLOCK_SIZE=64, TILE_IN_BLOCK=True, TMA=True)),
    "bf16-cache-tma-block64-prefix-d128": ("bf16", False, False, 4, 4, 128, 16, 64, 4, 3,
                                           dict(BLOCK_SIZE=64, TILE_IN_BLOCK=True, TMA=True)),
    # an fp8 cache of 64-token blocks (V keys-major) by TMA: cast up, and with FP8 dots
    "fp8-cache-tma-vt-block64-prefill-bf16-d128": ("bf16", True, False, 4, 4, 128, 32, 64, 4, 3, FP8_TMA_BLOCK64),
    "fp8-dots-tma-vt-block64-prefill-bf16-d128": ("bf16", True, True, 4, 4, 128, 32, 64, 4, 3, FP8_TMA_BLOCK64),
    "fp8-cache-tma-vt-block64-decode-bf16-d128": ("bf16", True, False, 4, 4, 128, 1, 64, 4, 2, FP8_TMA_BLOCK64),
    # head dim 256 (`head_256`): HEAD_256_PREFILL_LAUNCH and HEAD_256_DECODE_TILE's one-query and 64-row prefix
    # programs over a bf16 cache of 64-token blocks by TMA (the engine's default there), an fp8 cache, float32
    "bf16-cache-tma-block64-prefill-d256": ("bf16", False, False, 2, 2, 256, 32, 32, 4, 2, BF16_TMA_BLOCK64),
    "bf16-cache-tma-block64-decode-d256": ("bf16", False, False, 2, 2, 256, 1, 32, 4, 2, BF16_TMA_BLOCK64),
    "bf16-cache-tma-block64-prefix-d256": ("bf16", False, False, 2, 2, 256, 32, 32, 4, 2, BF16_TMA_BLOCK64),
    "fp8-cache-prefill-bf16-d256": ("bf16", True, False, 2, 2, 256, 32, 32, 4, 2),
    "fp8-cache-prefix-bf16-d256": ("bf16", True, False, 2, 2, 256, 32, 32, 4, 2),
    "fp32-cache-prefill-d256": ("fp32", False, False, 2, 2, 256, 16, 32, 4, 1),
    "fp32-cache-prefix-d256": ("fp32", False, False, 2, 2, 256, 32, 32, 4, 1),
    "bf16-cache-prefix-d256": ("bf16", False, False, 2, 2, 256, 32, 32, 4, 2),
    "fp8-dots-prefix-bf16-d256": ("bf16", True, True, 2, 2, 256, 32, 32, 4, 2),
}


def compile_variant(name: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from batchllm.attention import triton_backend as tb

    qdt, fp8, fp8_attention, group, group_pad, head_dim, block_q, block_n, warps, stages, *extra = VARIANTS[name]
    block_m = max(16, block_q * group_pad)
    fp8_dots = fp8 and fp8_attention and tb.fp8_dots_fit(block_m, block_n)
    kv = "*fp8e4nv" if fp8 else "*" + qdt
    pointers = {"Q": "*" + qdt, "Out": "*" + qdt, "K_cache": kv, "V_cache": kv, "KV_scale": "*fp32",
                "Part_out": "*fp32", "Part_lse": "*fp32"}
    constants = dict(BLOCK_SIZE=16, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
                     HEAD_DIM_PAD=tb.dot_head_dim(head_dim, fp8_dots), BLOCK_Q=block_q, BLOCK_M=block_m,
                     BLOCK_N=block_n, PRECISION="ieee" if qdt == "fp32" else "tf32", FP8_KV=fp8, FP8_DOTS=fp8_dots,
                     TILE_IN_BLOCK=False, V_KEYS_MAJOR=False, TMA=False)
    constants.update(*extra)  # a variant's own constants (block size, layout)
    # K and V descriptors: boxes of BLOCK_N keys by one head (TMA; a keys-major V's: one head's [head dim,
    # BLOCK_N]), else the caches again (unused)
    if constants["TMA"]:
        element = "fp8e4nv" if fp8 else qdt
        v_box = [head_dim, block_n] if constants["V_KEYS_MAJOR"] else [block_n, head_dim]
        pointers.update(K_desc=f"tensordesc<{element}[{block_n}, {head_dim}]>",
                        V_desc=f"tensordesc<{element}[{v_box[0]}, {v_box[1]}]>")
    else:
        pointers.update(K_desc=kv, V_desc=kv)
    kernel = tb._paged_attention_kernel
    signature = {n: "constexpr" if n in constants else pointers.get(n) or (
        "fp32" if n == "sm_scale_log2" else "i32" if n.startswith("stride") or n == "item_offset" else "*i32")
        for n in kernel.arg_names}
    # as a launch specializes them on the device: pointers and strides divisible by 16 (16-byte aligned
    # tensors, head dims of 16k), but not those the kernel declares do_not_specialize; without it the
    # loads are not vectorized and not pipelined (no cp.async), and shared memory is not the real one
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
               if n not in constants and n not in ("stride_bt", "item_offset")
               and (signature[n].startswith("*") or n.startswith("stride"))}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx = compiled.asm["ptx"]
    return {"variant": name, "fp8_dots": fp8_dots, "shared_bytes": compiled.metadata.shared,
            "e4m3_mma": bool(re.search(r"mma\S*\.e4m3\.e4m3", ptx)),
            "e4m3_to_f16_casts": ptx.count("cvt.rn.f16x2.e4m3x2"),
            "async_copies": len(re.findall(r"cp\.async\.c[ag]", ptx)),
            "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
            "shared_byte_loads": ptx.count("ld.shared.b8")}


def compile_seeded_noise() -> dict:
    """The seeded-sampling noise kernel (`layers/seeded_noise_triton.py`) for sm_90: its hash needs
    32-bit products and logical (unsigned) shifts, as the interpreter's numpy uint32 gives them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from batchllm.layers import seeded_noise_triton as noise

    signature = {"Keys": "*i64", "Out": "*fp32", "stride_out": "i32", "vocab": "i32", "BLOCK": "constexpr"}
    compiled = triton.compile(ASTSource(fn=noise._seeded_exponential_kernel, signature=signature,
                                        constexprs={"BLOCK": noise.BLOCK}),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    ptx = compiled.asm["ptx"]
    return {"variant": "seeded-noise", "logical_shifts": ptx.count("shr.u32"),
            "arithmetic_shifts": ptx.count("shr.s32"), "products_32": len(re.findall(r"mul\.lo\.[su]32", ptx))}


def compile_elementwise() -> dict:
    """The decoder's elementwise kernels (`layers/triton_ops.py`) for sm_90 in every SCALED / QUANT
    form the engine launches (bfloat16, the 8B widths): the interpreter runs jit helpers a compile
    refuses (a dtype returned from one, for instance). Returns the kernels built, by name."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from batchllm.layers import triton_ops as ops

    built = []
    for scaled in (False, True):
        for quant in (False, True):
            out = "*fp8e4nv" if quant else "*bf16"
            norm = {"X": "*bf16", "Residual": "*fp32", "Weight": "*bf16", "Out": out, "Scale": "*fp32",
                    "XScale": "*fp32", "WScale": "*fp32", "stride_x": "i32", "stride_r": "i32", "stride_o": "i32",
                    "n_cols": "i32", "eps": "fp32", "fp8_max": "fp32", "min_scale": "fp32", "HAS_RESIDUAL": "constexpr",
                    "QUANT": "constexpr", "SCALED": "constexpr", "BLOCK": "constexpr"}
            triton.compile(ASTSource(fn=ops._rms_norm_kernel, signature=norm, constexprs=dict(
                HAS_RESIDUAL=True, QUANT=quant, SCALED=scaled, BLOCK=4096)),
                target=GPUTarget("cuda", 90, 32), options=dict(num_warps=16))
            silu = {"GateUp": "*bf16", "Out": out, "Scale": "*fp32", "XScale": "*fp32", "WScale": "*fp32",
                    "stride_g": "i32", "stride_o": "i32", "n_cols": "i32", "fp8_max": "fp32", "min_scale": "fp32",
                    "QUANT": "constexpr", "SCALED": "constexpr", "BLOCK": "constexpr"}
            triton.compile(ASTSource(fn=ops._silu_and_mul_kernel, signature=silu, constexprs=dict(
                QUANT=quant, SCALED=scaled, BLOCK=16384 if quant else 1024)),
                target=GPUTarget("cuda", 90, 32), options=dict(num_warps=16 if quant else 4))
            built += [f"norm-scaled{int(scaled)}-quant{int(quant)}", f"silu-scaled{int(scaled)}-quant{int(quant)}"]
        rotary = {"X": "*bf16", "Positions": "*i64", "Cos": "*fp32", "SinSigned": "*fp32", "XScale": "*fp32",
                  "WScale": "*fp32", "stride_xt": "i32", "stride_xh": "i32", "stride_table": "i32", "num_heads": "i32",
                  "rotated_heads": "i32", "HALF": "constexpr", "BLOCK_H": "constexpr", "SCALED": "constexpr"}
        triton.compile(ASTSource(fn=ops._rotary_kernel, signature=rotary, constexprs=dict(
            HALF=64, BLOCK_H=16, SCALED=scaled)), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
        built.append(f"rotary-scaled{int(scaled)}")
    return {"variant": "elementwise", "built": built}


SPECIAL = {"seeded-noise": compile_seeded_noise, "elementwise": compile_elementwise}
"""Variants that are not the attention kernel's, by name."""

if __name__ == "__main__":  # (not at import: a test reading VARIANTS keeps its process's interpreter setting)
    os.environ.pop("TRITON_INTERPRET", None)
    for variant in sys.argv[1:] or VARIANTS:
        print(json.dumps(SPECIAL[variant]() if variant in SPECIAL else compile_variant(variant)), flush=True)
