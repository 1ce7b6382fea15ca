"""Decode CUDA graphs, everything but the capture, on CPU: the static plan's layout (what the fixed
launches read) against the reference attention, the capture sizes, and the engine running decode
steps through the graphs' buffers (Triton interpreted) with HF's greedy tokens."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from batchllm.attention.static_decode_plan import StaticDecodePlan
from batchllm.attention.torch_ref import TorchReferenceBackend
from batchllm.attention.triton_backend import COUNT_SLOT, ITEM_FIELDS, TritonBackend
from batchllm.attention.work_items import WorkItems
from batchllm.runner.cuda_graphs import capture_sizes
from tests.attention_cases import group_decode, random_case
from tests.helpers import with_kv_scales
from tests.unit.test_work_items import run_plan_in_torch


def test_capture_sizes_cover_every_batch_with_little_padding():
    sizes = capture_sizes(512)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 512 and sizes == sorted(set(sizes))
    assert all(b - a <= max(8, a / 8) for a, b in zip(sizes, sizes[1:]))  # n pads by < max(8, n / 8) rows
    assert len(sizes) == 35
    assert capture_sizes(1) == [1] and capture_sizes(6) == [1, 2, 4, 6] and capture_sizes(100)[-1] == 100
    large = capture_sizes(8192)  # beyond 512: 8 sizes per doubling, the same padding bound
    assert large[:35] == sizes and large[-1] == 8192 and len(large) == 35 + 4 * 8
    assert all(b - a <= a / 8 for a, b in zip(large, large[1:]) if a >= 512)
    assert capture_sizes(700) == [*sizes, 576, 640, 700]


def test_the_collector_stays_off_until_the_last_of_two_overlapping_captures_ends():
    """Two engines capturing in two threads at once: the first to finish leaves the collector off under the other's
    capture; the last restores it, and only where it ran before (a caller's own gc.disable() holds)."""
    import gc
    import threading

    from batchllm.runner.cuda_graphs import collector_held

    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with collector_held():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with collector_held():
            second_in.set()
            first_out.wait(10)
            seen["after the first left"] = gc.isenabled()
        seen["after both left"] = gc.isenabled()

    assert gc.isenabled()
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen == {"after the first left": False, "after both left": True}
    gc.disable()
    try:
        with collector_held():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_small_models_get_decode_graphs_up_to_8192_sequences_large_ones_up_to_1024():
    """The default of max_cudagraph_capture_size, by the model's hidden size (the shapes of benchmarks/configs)."""
    from pathlib import Path

    from batchllm.engine import default_graph_batch
    from batchllm.models.spec import read_model_spec

    configs = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
    batches = {name: default_graph_batch(read_model_spec(configs / name))
               for name in ("smollm2-135m", "llama-3.2-1b", "qwen2.5-7b", "llama-3.1-8b", "llama-3.1-70b")}
    assert batches == {"smollm2-135m": 8192, "llama-3.2-1b": 8192, "qwen2.5-7b": 1024, "llama-3.1-8b": 1024,
                       "llama-3.1-70b": 1024}


def test_capture_size_setting_is_checked_and_cpu_engines_capture_nothing(default_llm):
    from batchllm.config import ModelConfig

    with pytest.raises(ValueError, match="max_cudagraph_capture_size must be >= 1"):
        ModelConfig(max_cudagraph_capture_size=0)
    assert default_llm.engine.runner.decode_graphs is None  # graphs are for CUDA (and the Triton attention)


def items_the_launches_read(plan: StaticDecodePlan) -> WorkItems:
    """Decode the buffer as the fixed launches do: items [0, count0) of the prefix section, items
    [0, count1) of the one-query section, `count2` merged tokens."""
    buf = plan.buffer.numpy()

    def field(name, n, start=0):
        at = plan.offsets[name] + start
        return buf[at:at + n].copy()

    n_prefix, n_single, n_merge = (int(buf[plan.offsets["counts"] + i * COUNT_SLOT]) for i in range(3))
    items = {name: np.r_[field(name, n_prefix), field(name, n_single, plan.prefix_section)] for name in ITEM_FIELDS}
    merge_ptr = field("merge_ptr", n_merge + 1)
    num_q = plan.capacity["q_tokens"]
    return WorkItems(**items, q_tokens=field("q_tokens", num_q), q_pos=field("q_pos", num_q), num_partials=0,
                     merge_tokens=field("merge_tokens", n_merge), merge_ptr=merge_ptr,
                     merge_parts=field("merge_parts", int(merge_ptr[-1])), num_group_items=0,
                     num_prefix_items=n_prefix)


DECODE_CASES = [
    ("plain", [(37, 1), (300, 1), (5, 1)], {}),
    ("groups", group_decode(6, 300, 20) + [(90, 1)] + group_decode(4, 280, 3, group=1),
     dict(min_members=2, min_shared=1)),
    ("nested", [(610 + j, 1, [(0, 300), (1 + j % 3, 600)]) for j in range(6)] + [(350, 1, [(0, 300)])] * 2,
     dict(min_members=1, min_shared=1)),
    ("split-k", [(1500, 1), (700, 1)] + group_decode(4, 600, 90), dict(split_len=128, min_members=2)),
    ("long-unsplit", [(600, 1), (1500, 1), (100, 1), (2600, 1)], dict(split_len=10**9)),
]


@pytest.mark.parametrize("name, specs, options", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_static_plan_computes_the_reference_attention(name, specs, options):
    """A plan filled for the graph of 16 sequences (after one for another step, so stale entries
    are in the buffer): the items its launches read give the reference attention, and 0 for the
    padding rows."""
    q, k, v, cache, md = random_case(specs, 8, 2, 64, 16, torch.float32, seed=5, device="cpu")
    ref = TorchReferenceBackend().forward(q, k, v, cache.clone(), md, 0.125)
    TorchReferenceBackend().forward(q, k, v, cache, md, 0.125)  # the new tokens' K/V into the cache
    plan = StaticDecodePlan(TritonBackend(**options), 16, 8, 2, 64, torch.device("cpu"), block_size=16)
    stale = [(2000, 1)] * 12
    assert plan.fill(list(range(13)), [c + n for c, n in stale], None, 16)
    assert plan.fill(md.query_start_loc_cpu, md.seq_lens_cpu, md.share_levels_cpu, 16)
    items = items_the_launches_read(plan)
    if name not in ("plain", "long-unsplit"):
        assert plan.last_items.num_prefix_items > 0 and len(items.merge_tokens) > 0
    padded = torch.cat([q, torch.full((16 - len(q), *q.shape[1:]), float("nan"))])
    got = run_plan_in_torch(padded, cache, md, items, 0.125)
    torch.testing.assert_close(got[:len(q)], ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[len(q):], torch.zeros(16 - len(q), *q.shape[1:]))
    # the graph's programs take the eager step's items in its launch order (longest key range first)
    eager = TritonBackend(**options)._plan(md, 4, 8, 64, 2, q.element_size()).tensors
    n = len(eager["seq"])
    for name in ITEM_FIELDS:
        assert getattr(items, name)[:n].tolist() == eager[name].tolist(), name


def test_a_step_whose_plan_outgrows_the_graph_is_refused():
    """More split-K pieces than the graph of 4 has programs for: fill says no and writes nothing."""
    plan = StaticDecodePlan(TritonBackend(split_len=64), 8, 8, 2, 64, torch.device("cpu"), extra_items=2,
                            block_size=16)
    before = plan.buffer.clone()
    assert not plan.fill([0, 1, 2], [1000, 900], None, 4)
    assert torch.equal(plan.buffer, before)
    assert plan.fill([0, 1, 2], [100, 90], None, 4)  # two pieces each: 4 <= 4 + 2


def test_split_k_per_launch_fits_the_graph_where_the_joint_split_does():
    """Split-K per launch (`plan_work_items(split_per_launch=True)`) cuts the prefix launch by its own
    keys too, so both sections may gain `extra` pieces and the partial rows with them: 64 decodes
    under two nested levels (all of them, then 8 groups of 8) with long shared and own parts, the
    case a random search found (711 partial rows, more than the graph had room for before), fill
    the graph of 64 either way."""
    import numpy as np

    batch, rng = 64, np.random.default_rng(0)
    for _ in range(5):  # the search's fifth draw
        outer = int(rng.integers(1000, 60000))
        inner_extra = rng.integers(256, 30000, size=8)
        own = (rng.integers(1, 30000, size=batch) if rng.random() < 0.5
               else np.full(batch, int(rng.integers(1, 30000))))
    inner = np.repeat(np.arange(8), 8)
    shared = outer + inner_extra[inner]
    lens = (shared + own).tolist()
    levels = [([0] * batch, [outer] * batch), ((1 + inner).tolist(), shared.tolist())]
    loc = list(range(batch + 1))
    for per_launch in (False, True):
        plan = StaticDecodePlan(TritonBackend(split_per_launch=per_launch), batch, 64, 8, 64, torch.device("cpu"),
                                block_size=16)
        assert plan.fill(loc, lens, levels, batch), f"split_per_launch={per_launch}"
        if per_launch:
            assert plan.last_items.num_partials > 3 * batch + plan.extra * plan.wide


pytest.importorskip("triton")
interpreted = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter tests: CPU-only machines (tests/gpu captures real graphs)",
)


@interpreted
def test_decode_steps_through_the_graph_buffers_give_hf_greedy_tokens(tiny_model_factory):
    """The engine with graphs of up to 4 sequences, run without capture (the same buffers, plans and
    fixed launches, eagerly, Triton interpreted): decode steps of 4 or fewer sequences take that
    path, padded to 1, 2 or 4 rows; steps of 5 and prefill steps run eagerly; tokens equal HF's."""
    from batchllm import LLM, SamplingParams
    from batchllm.layers.triton_ops import TritonOps
    from tests.helpers import hf_greedy

    model_dir = tiny_model_factory("llama")
    llm = LLM(model_dir, device="cpu", dtype="float32", max_num_batched_tokens=32, skip_tokenizer_init=True)
    llm.engine.model.use_ops(TritonOps())
    runner = llm.engine.runner
    runner.backend = TritonBackend(min_members=2, min_shared=1)
    runner.setup_decode_graphs(4, llm.max_model_len, capture=False, extra_items=4)
    shared = list(range(100, 140))
    prompts = [shared + [7 + i, 300 + i] for i in range(4)] + [list(range(500, 520))]
    lengths = [3, 9, 5, 7, 6]  # the batch shrinks 5 -> 4 -> 3 -> 2 -> 1 (graph sizes 4, 4, 2, 1)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sizes_used = [s for s in runner.decode_graphs.sizes if s in (1, 2, 4)]
    assert runner.num_graph_steps >= 5 and sizes_used == [1, 2, 4]
    want = [hf_greedy(model_dir, [p], n, stop_at_eos=False)[0] for p, n in zip(prompts, lengths)]
    assert [o.outputs[0].token_ids for o in outputs] == want
    assert runner.decode_graphs.plan.last_items is not None


@interpreted
def test_graph_steps_survive_preemption_and_placeholders(tiny_model_factory):
    """Asynchronous scheduling (placeholder tokens filled from the step before, in the graph's
    buffer) and a KV pool small enough to preempt: the same tokens as the eager engine."""
    from batchllm import LLM, SamplingParams
    from batchllm.layers.triton_ops import TritonOps

    model_dir = tiny_model_factory("qwen3")
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 200) for _ in range(rng.randrange(3, 30))] for _ in range(6)]
    params = [SamplingParams(max_tokens=rng.randrange(4, 12), temperature=0.0, ignore_eos=True) for _ in prompts]

    def run(graphs: bool):
        llm = LLM(model_dir, device="cpu", dtype="float32", max_num_batched_tokens=32, skip_tokenizer_init=True,
                  block_size=4, num_kv_blocks=24, async_scheduling=True, kv_admission_threshold=4.0)
        llm.engine.model.use_ops(TritonOps())
        runner = llm.engine.runner
        runner.backend = TritonBackend()
        if graphs:
            runner.setup_decode_graphs(8, llm.max_model_len, capture=False, extra_items=2)
        out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in out], runner.num_graph_steps, llm.last_stats["num_preemptions"]

    eager, none, _ = run(False)
    got, graph_steps, preemptions = run(True)
    assert none == 0 and graph_steps > 0 and preemptions > 0
    assert got == eager


@interpreted
def test_fp8_cache_through_the_graph_buffers_gives_the_reference_tokens(tiny_model_factory, tmp_path):
    """An fp8 KV cache with checkpoint scales (0.5 for K, 2.0 for V): decode steps through the
    graphs' buffers (static plans, Triton interpreted) give the tokens of the torch reference over
    the same fp8 cache; the shared prefix's partial block is copied as bytes (copy-on-write)."""
    import shutil

    from batchllm import LLM, SamplingParams
    from batchllm.layers.triton_ops import TritonOps

    model_dir = tmp_path / "scaled"
    shutil.copytree(tiny_model_factory("llama"), model_dir)
    with_kv_scales(model_dir, 0.5, 2.0)  # (with a quantization_config that loads them, all its linears ignored)
    shared = list(range(100, 140))
    prompts = [shared + [7 + i, 300 + i] for i in range(4)] + [list(range(500, 520))]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (3, 9, 5, 7, 6)]

    def run(graphs: bool):
        llm = LLM(str(model_dir), device="cpu", dtype="float32", max_num_batched_tokens=32, skip_tokenizer_init=True,
                  kv_cache_dtype="fp8")
        runner = llm.engine.runner
        assert runner.kv_cache.dtype == torch.float8_e4m3fn
        assert llm.engine.model.kv_scales[:, :2].tolist() == [[0.5, 2.0]] * 2
        if graphs:
            llm.engine.model.use_ops(TritonOps())
            runner.backend = TritonBackend(min_members=2, min_shared=1)
            runner.setup_decode_graphs(4, llm.max_model_len, capture=False, extra_items=4)
        out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert llm.last_stats["num_block_copies"] > 0 and llm.last_stats["kv_cache_dtype"] == "float8_e4m3fn"
        return [o.outputs[0].token_ids for o in out], runner.num_graph_steps

    want, _ = run(False)
    got, graph_steps = run(True)
    assert graph_steps >= 5
    assert got == want
