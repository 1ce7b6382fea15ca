"""Prefill attention: the engine's Triton kernel against torch's fused attention kernels on the same steps.

    python3 benchmarks/flash_prefill_bench.py [--json-out FILE]    (on the device)
    python3 benchmarks/flash_prefill_bench.py --cudnn               cuDNN only
    python3 benchmarks/flash_prefill_bench.py --probe               what this torch's cuDNN attention takes

Each case is a step of prefill chunks (cached, new) over a bf16 cache of 64-token blocks (the Hopper
default). Per case, ms per layer (median of CUDA-graph replays) and TFLOP/s over the causal pairs:
- `triton`: `TritonBackend().forward` (the fused KV store, the plan's launches, the merge);
- `flash_gather`: the KV store, then each sequence's keys [0, length) gathered from the paged cache
  into one contiguous tensor, then `torch.ops.aten._flash_attention_forward` (FlashAttention 2) over
  all sequences at once (varlen, causal aligned bottom-right, GQA natively);
- `flash_fresh` (steps whose chunks all start at position 0): the store, then flash over the step's own
  K and V (no gather); `flash_only`: the flash call alone on the gathered keys;
- `sdpa_*` (one fresh chunk): `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` with
  one backend allowed (flash, cuDNN, memory-efficient).
--cudnn: `torch.ops.aten._scaled_dot_product_cudnn_attention` on one chunk per call: a fresh chunk as one
causal call; a chunk after cached context as a non-causal call over the gathered context and a causal
call over its own keys, merged by log-sum-exp (in torch); and a group's stacked suffix queries over
their shared prefix. --probe: cuDNN's first call at new lengths (it builds a plan per shape), its
log-sum-exp's layout, and its varlen op (`_cudnn_attention_forward`, where torch has it).
Every torch output is checked against the Triton output (max |difference|, printed).
Results and what came of them (an engine path through cuDNN, measured and not kept): docs/benchmarks.md,
session 17.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton

from batchllm.attention.kv_store_triton import store_kv_triton
from batchllm.attention.triton_backend import TritonBackend
from benchmarks import attention_bench
from benchmarks.attention_bench import causal_flops
from tests.attention_cases import random_case

rows = []


def graph_ms(fn, rep=50):
    """`attention_bench.graph_ms`; a call that cannot be captured in a CUDA graph is timed eagerly, said so."""
    try:
        return attention_bench.graph_ms(fn, rep=rep)
    except Exception as error:
        print(f"  (not capturable: {type(error).__name__}: {str(error)[:120]}; timed eagerly)", flush=True)
        return triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median")


def triton_baseline(case, scale):
    """The engine's Triton attention on `case`: its output (what the torch kernels are checked against,
    the plan made by this first call as by a step's first layer) and its time per call."""
    q, k, v, cache, md = case
    backend = TritonBackend()
    md.backend_cache.clear()
    reference = backend.forward(q, k, v, cache, md, scale)
    return reference, graph_ms(lambda: backend.forward(q, k, v, cache, md, scale))


def gather_index(md) -> torch.Tensor:
    """Each sequence's cache slots for positions 0 .. length - 1, sequences one after another."""
    slots = []
    for table, length in zip(md.block_tables_cpu, md.seq_lens_cpu):
        positions = torch.arange(length)
        blocks = torch.tensor(table, dtype=torch.long)[positions // md.block_size]
        slots.append(blocks * md.block_size + positions % md.block_size)
    return torch.cat(slots).cuda()


def flash(q, k, v, md, cu_k, max_k, scale):
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, md.query_start_loc, cu_k, md.max_query_len, max_k, 0.0, True, False, scale=scale)
    return out[0]


def run_case(specs, label, heads=32, kv_heads=8, head_dim=128):
    q, k, v, cache, md = case = random_case(specs, heads, kv_heads, head_dim, 64, torch.bfloat16, seed=0)
    scale = head_dim ** -0.5
    flops = causal_flops(specs, heads, head_dim)
    row = {"case": f"{label}, {heads}/{kv_heads} x {head_dim}"}
    reference, triton_ms = triton_baseline(case, scale)
    times = {"triton": triton_ms}

    index = gather_index(md)
    keys_flat = cache[0].reshape(-1, kv_heads, head_dim)
    values_flat = cache[1].reshape(-1, kv_heads, head_dim)
    cu_k = torch.tensor([0, *torch.tensor(md.seq_lens_cpu).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    max_k = max(md.seq_lens_cpu)

    def flash_gather():
        store_kv_triton(k, v, cache, md.slot_mapping, None)
        return flash(q, keys_flat.index_select(0, index), values_flat.index_select(0, index), md, cu_k, max_k, scale)

    out = flash_gather()
    row["flash_gather_max_diff"] = round((out.float() - reference.float()).abs().max().item(), 5)
    times["flash_gather"] = graph_ms(flash_gather)
    k_all, v_all = keys_flat.index_select(0, index), values_flat.index_select(0, index)
    times["flash_only"] = graph_ms(lambda: flash(q, k_all, v_all, md, cu_k, max_k, scale))
    times["gather_only"] = graph_ms(lambda: (keys_flat.index_select(0, index), values_flat.index_select(0, index)))
    try:  # torch's varlen API over the paged cache itself (block_table), where this torch has it
        from torch.nn.attention.varlen import varlen_attn

        seq_lens = torch.tensor(md.seq_lens_cpu, dtype=torch.int32, device="cuda")

        def flash_paged():
            store_kv_triton(k, v, cache, md.slot_mapping, None)
            return varlen_attn(q, cache[0], cache[1], md.query_start_loc, None, md.max_query_len, max_k,
                               window_size=(-1, 0), enable_gqa=True, seqused_k=seq_lens, block_table=md.block_tables,
                               scale=scale)

        out = flash_paged()
        row["flash_paged_max_diff"] = round((out.float() - reference.float()).abs().max().item(), 5)
        times["flash_paged"] = graph_ms(flash_paged)
    except Exception as error:
        row["flash_paged"] = f"unavailable: {type(error).__name__}: {str(error)[:160]}"
    if all(c == 0 for c, _ in specs):
        def flash_fresh():
            store_kv_triton(k, v, cache, md.slot_mapping, None)
            return flash(q, k, v, md, md.query_start_loc, md.max_query_len, scale)

        out = flash_fresh()
        row["flash_fresh_max_diff"] = round((out.float() - reference.float()).abs().max().item(), 5)
        times["flash_fresh"] = graph_ms(flash_fresh)
    if len(specs) == 1 and specs[0][0] == 0:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qd, kd, vd = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        for name, kind in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                           ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def sdpa(kind=kind):
                with sdpa_kernel([kind]):
                    return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True, scale=scale)
            try:
                sdpa()
                times[name] = graph_ms(sdpa)
            except Exception as error:
                row[name] = f"unavailable: {type(error).__name__}: {str(error)[:100]}"
    for name, t in times.items():
        row[name] = f"{t:.4f} ms {flops / t / 1e9:.0f} TFLOP/s"
    row["triton_vs_flash_gather"] = round(times["triton"] / times["flash_gather"], 3)
    if "flash_fresh" in times:
        row["triton_vs_flash_fresh"] = round(times["triton"] / times["flash_fresh"], 3)
    rows.append(row)
    print(json.dumps(row), flush=True)


CASES = [
    ([(0, 8192)], "8,192 new"),
    ([(0, 16200)], "16,200 new (a 16K group's first prompt)"),
    ([(8192, 8192)], "8,192 new after 8,192"),
    ([(0, 2200)] * 7, "7 x 2,200 new (degree 16's first prompts, no sharing)"),
    ([(2000, 200)] * 40, "40 x 200 after 2,000"),
    ([(16000, 200)] * 40, "40 x 200 after 16,000"),
    ([(0, 2000)] * 3 + [(2000, 200)] * 10, "mixed: 3 x 2,000 new + 10 x 200 after 2,000"),
]


def cudnn(q, k, v, causal, scale):
    """torch's cuDNN attention on [1, heads, length, dim] views: (output, natural log-sum-exp [1, heads, Lq])."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def merge_two(o1, l1, o2, l2):
    l1, l2 = l1.reshape(o1.shape[:-1]), l2.reshape(o2.shape[:-1])
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m).unsqueeze(-1), torch.exp(l2 - m).unsqueeze(-1)
    return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(o1.dtype)


def heads_first(x):
    return x.transpose(0, 1).unsqueeze(0)


def cudnn_case(cached, new, scale):
    """One cuDNN row: a fresh chunk (one causal call) or a chunk after context (two calls, merged)."""
    specs = [(cached, new)]
    q, k, v, cache, md = case = random_case(specs, 32, 8, 128, 64, torch.bfloat16, seed=0)
    flops = causal_flops(specs, 32, 128)
    reference, triton_ms = triton_baseline(case, scale)
    times = {"triton": triton_ms}
    row = {"case": f"cudnn: {new} new after {cached}"}
    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    if cached == 0:
        def fresh():
            store_kv_triton(k, v, cache, md.slot_mapping, None)
            return cudnn(qh, kh, vh, True, scale)[0]
        try:
            out = fresh()
            row["gqa_max_diff"] = round((out[0].transpose(0, 1).float() - reference.float()).abs().max().item(), 5)
            times["cudnn_gqa"] = graph_ms(fresh)
        except Exception as error:
            row["cudnn_gqa"] = f"failed: {type(error).__name__}: {str(error)[:200]}"
        ke, ve = kh.repeat_interleave(4, 1), vh.repeat_interleave(4, 1)
        times["cudnn_expanded"] = graph_ms(lambda: cudnn(qh, ke, ve, True, scale)[0])
    else:
        index = gather_index(md)
        index = index[:cached]  # the context's slots
        keys_flat = cache[0].reshape(-1, 8, 128)
        values_flat = cache[1].reshape(-1, 8, 128)

        def with_context():
            store_kv_triton(k, v, cache, md.slot_mapping, None)
            kc = heads_first(keys_flat.index_select(0, index))
            vc = heads_first(values_flat.index_select(0, index))
            o1, l1 = cudnn(qh, kc, vc, False, scale)
            o2, l2 = cudnn(qh, kh, vh, True, scale)
            return merge_two(o1, l1, o2, l2)
        try:
            out = with_context()
            row["gqa_max_diff"] = round((out[0].transpose(0, 1).float() - reference.float()).abs().max().item(), 5)
            times["cudnn_two_calls"] = graph_ms(with_context)
            kc = heads_first(keys_flat.index_select(0, index))
            vc = heads_first(values_flat.index_select(0, index))
            o1, l1 = cudnn(qh, kc, vc, False, scale)
            o2, l2 = cudnn(qh, kh, vh, True, scale)
            times["merge_only"] = graph_ms(lambda: merge_two(o1, l1, o2, l2))
            times["context_call_only"] = graph_ms(lambda: cudnn(qh, kc, vc, False, scale))
        except Exception as error:
            row["cudnn_two_calls"] = f"failed: {type(error).__name__}: {str(error)[:200]}"
    for name, t in times.items():
        row[name] = f"{t:.4f} ms {flops / t / 1e9:.0f} TFLOP/s"
    rows.append(row)
    print(json.dumps(row), flush=True)


def cudnn_rows():
    """cuDNN on fresh chunks of several lengths (one call, causal) and on a chunk after context (the
    context's keys gathered, one non-causal call with the log-sum-exp, one causal call over the chunk's
    own keys, merged), against the Triton kernel."""
    scale = 128 ** -0.5
    for cached, new in ((0, 1024), (0, 2200), (0, 4096), (0, 8192), (0, 16200), (8192, 8192), (200, 16000),
                        (2000, 2200), (16000, 200)):
        cudnn_case(cached, new, scale)
    # a group's members' suffix queries stacked against their shared prefix (non-causal): 15 x 200 vs 16,000
    q = torch.randn(1, 32, 3000, 128, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 8, 16000, 128, device="cuda", dtype=torch.bfloat16)
    try:
        t = graph_ms(lambda: cudnn(q, kv, kv, False, scale))
    except Exception as error:
        print(f"stacked: failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
        return
    flops = 4 * 32 * 128 * 3000 * 16000
    print(json.dumps({"case": "cudnn: 3,000 stacked queries over a 16,000-key prefix, non-causal",
                      "cudnn": f"{t:.4f} ms {flops / t / 1e9:.0f} TFLOP/s"}), flush=True)


def first_call_ms():
    """cuDNN builds an execution plan per shape: the first call at each of several new lengths against the
    second (wall ms, synchronized), causal fresh chunks and non-causal context calls."""
    import time

    scale = 128 ** -0.5
    for causal in (True, False):
        for n in [2048 + 37 * i for i in range(6)] + [4096 + 101 * i for i in range(3)]:
            q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, 8, n + (0 if causal else 1000), 128, device="cuda", dtype=torch.bfloat16)
            walls = []
            for _ in range(3):
                torch.cuda.synchronize()
                start = time.perf_counter()
                cudnn(q, k, k, causal, scale)
                torch.cuda.synchronize()
                walls.append(round((time.perf_counter() - start) * 1e3, 3))
            print(json.dumps({"first_calls": f"causal={causal} n={n}", "wall_ms": walls}), flush=True)


def probe():
    """What this torch offers: its cuDNN attention ops, their LSE's shape, a varlen call over 7 x 2,200."""
    first_call_ms()
    print([n for n in dir(torch.ops.aten) if "cudnn_attention" in n or "flash_attention" in n], flush=True)
    scale = 128 ** -0.5
    q = torch.randn(1, 32, 300, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 500, 128, device="cuda", dtype=torch.bfloat16)
    o, lse = cudnn(q, k, k, False, scale)
    s_ = (q.float() @ k.repeat_interleave(4, 1).float().transpose(-1, -2)) * scale
    print("lse", tuple(lse.shape), lse.stride(), "max err vs natural logsumexp",
          (lse.reshape(1, 32, 300) - torch.logsumexp(s_, -1)).abs().max().item(), flush=True)
    op = getattr(torch.ops.aten, "_cudnn_attention_forward", None)
    if op is not None:
        print(op.default._schema, flush=True)
        specs = [(0, 2200)] * 7
        q, k, v, cache, md = case = random_case(specs, 32, 8, 128, 64, torch.bfloat16, seed=0)
        ref, t_tri = triton_baseline(case, scale)
        try:
            out = op(q, k, v, None, md.query_start_loc, md.query_start_loc, 2200, 2200, True, 0.0, True, False,
                     scale=scale)
            print("varlen shapes", [tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in out], flush=True)
            print("varlen max diff", (out[0].float() - ref.float()).abs().max().item(), flush=True)
            t = graph_ms(lambda: op(q, k, v, None, md.query_start_loc, md.query_start_loc, 2200, 2200, True, 0.0,
                                    True, False, scale=scale))
            print(f"varlen 7 x 2200: cudnn {t:.4f} ms, triton {t_tri:.4f} ms", flush=True)
        except Exception as error:
            print("varlen failed:", type(error).__name__, str(error)[:300], flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--cudnn", action="store_true", help="only the cuDNN rows")
    parser.add_argument("--probe", action="store_true", help="only what this torch's cuDNN attention takes")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(0), torch.__version__, flush=True)
    if args.probe:
        probe()
        raise SystemExit(0)
    if args.cudnn:
        cudnn_rows()
        raise SystemExit(0)
    try:
        from torch.nn.attention import current_flash_attention_impl
        print("flash impl:", current_flash_attention_impl(), flush=True)
    except ImportError:
        pass
    for specs, label in CASES:
        run_case(specs, label)
    run_case([(0, 8192)], "8,192 new", heads=64, kv_heads=8)
    run_case([(0, 8192)], "8,192 new", head_dim=64)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
