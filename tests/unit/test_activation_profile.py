"""The measured activation reserve (`runner.activation_profile`), the parts that run without a GPU: the probe
step's forward runs every layer with no KV cache and no attention, its sampling takes one slice of rows through
the sampler's widest path, and the bound on the attention's partial buffers holds for the plans the Triton
backend makes."""

from __future__ import annotations

import random

import pytest
import torch

from batchllm.attention.work_items import plan_work_items
from batchllm.layers import sampler
from batchllm.models.loader import build_model
from batchllm.models.spec import read_model_spec
from batchllm.runner.activation_profile import (
    PARTIAL_ROWS_PER_TOKEN,
    SPLIT_ROWS,
    attention_workspace_bytes,
    block_table_bytes,
    probe_forward,
    probe_prompt_logprobs,
    probe_sampling,
    widest_sampling_specs,
)
from tests.helpers import make_tiny_model
from tests.unit.test_work_items import layout, share_levels_of


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model_dir = make_tiny_model("llama", tmp_path_factory.mktemp("profile"))
    spec = read_model_spec(model_dir)
    return build_model(spec, model_dir, max_positions=64, dtype=torch.float32, device=torch.device("cpu"),
                       load_format="dummy")


def test_probe_forward_runs_every_layer_without_a_cache(tiny_model):
    """More tokens than the rotary table holds (positions wrap), no KV cache: finite hidden states of the step's
    shape, which depend on the weights (the layers ran)."""
    hidden = probe_forward(tiny_model, 100)
    assert hidden.shape == (100, tiny_model.spec.hidden_size) and torch.isfinite(hidden).all()
    with torch.no_grad():
        tiny_model.model.layers[-1].mlp.down_proj.weight.mul_(2)
    try:
        assert not torch.equal(probe_forward(tiny_model, 100), hidden)
    finally:
        with torch.no_grad():
            tiny_model.model.layers[-1].mlp.down_proj.weight.div_(2)


def test_probe_sampling_and_prompt_logprobs_take_one_slice_each(tiny_model, monkeypatch):
    vocab = tiny_model.full_spec.vocab_size
    monkeypatch.setattr(sampler, "LOGITS_PER_SLICE", 4 * vocab)
    widths = []
    compute_logits = tiny_model.compute_logits
    monkeypatch.setattr(tiny_model, "compute_logits", lambda h: widths.append(h.shape[0]) or compute_logits(h))
    hidden = probe_forward(tiny_model, 10)
    tokens = probe_sampling(tiny_model, hidden, 10, max_logprobs=5)
    assert widths == [4] and tokens.shape == (4,) and ((tokens >= 0) & (tokens < vocab)).all()
    assert probe_sampling(tiny_model, hidden, 10, max_logprobs=5, driver=False) is None and widths == [4, 4]
    probe_prompt_logprobs(tiny_model, hidden, max_logprobs=5)  # one slice of the step's rows, whatever max_num_seqs
    assert widths == [4, 4, 4]
    specs = widest_sampling_specs(5, 4)
    assert [s.is_greedy for s in specs] == [True, False, False, False]  # (drawn rows copied out of the logits)
    assert {s.seed is None for s in specs[1:]} == {True, False} and all(s.num_logprobs == 5 for s in specs)


@pytest.mark.parametrize("seed", range(60))
def test_partial_buffers_stay_within_the_reserved_bound(seed):
    """Random steps of prefill chunks, decodes and prefix groups nested two deep, planned as the backend plans
    them (split-K lengths from the step's keys, per launch or not): their partial rows never exceed the bound
    `attention_workspace_bytes` reserves."""
    rng = random.Random(seed)
    specs = layout(rng)
    loc = [0]
    for _, n, _ in specs:
        loc.append(loc[-1] + n)
    kv_heads = rng.choice([1, 2, 8])
    items = plan_work_items(loc, [c + n for c, n, _ in specs], rng.choice([16, 64, 128]), share_levels_of(specs),
                            num_kv_heads=kv_heads, group_block_q=rng.choice([8, 16, 64]), min_members=1, min_shared=1,
                            align=rng.choice([1, 16, 64]), split_per_launch=rng.choice([False, True]))
    pieces = 2 * (512 // kv_heads + 1)
    assert items.num_partials <= PARTIAL_ROWS_PER_TOKEN * loc[-1] + SPLIT_ROWS * pieces
    heads, head_dim = 4 * kv_heads, 64
    rows_bytes = attention_workspace_bytes(loc[-1], heads, head_dim, kv_heads) - attention_workspace_bytes(0, heads,
                                                                                                          head_dim,
                                                                                                          kv_heads)
    assert rows_bytes == PARTIAL_ROWS_PER_TOKEN * loc[-1] * heads * (head_dim + 1) * 4


@pytest.mark.parametrize("kv_heads", [1, 8])
@pytest.mark.parametrize("context", [1450, 6400, 30000])
@pytest.mark.parametrize("split_per_launch", [False, True])
def test_partial_buffers_of_a_wide_nested_decode_step_stay_within_the_bound(kv_heads, context, split_per_launch):
    """The widest case the bound is for: 8,192 decode rows each under two nested groups (a prefix item of each
    level and a suffix item: three partial rows per token, more where split-K cuts the prefix items)."""
    n = 8192
    levels = [([i // 16 for i in range(n)], [700] * n), ([n + i // 8 for i in range(n)], [1400] * n)]
    items = plan_work_items(list(range(n + 1)), [context] * n, 64, levels, num_kv_heads=kv_heads, group_block_q=16,
                            align=64, split_per_launch=split_per_launch)
    assert items.num_partials >= PARTIAL_ROWS_PER_TOKEN * n  # (the case is as wide as the bound's per-token part)
    assert items.num_partials <= PARTIAL_ROWS_PER_TOKEN * n + SPLIT_ROWS * 2 * (512 // kv_heads + 1)


def test_block_copies_go_in_bounded_chunks_in_list_order(tiny_model, monkeypatch):
    """Copy-on-write copies gather their source blocks into a temporary: chunks of at most BLOCK_COPY_BYTES
    (here two blocks) copy in list order: a copy of a block copied in an earlier chunk takes the new bytes (one
    gather of every pair, as before, took the old ones)."""
    from batchllm.attention.torch_ref import TorchReferenceBackend
    from batchllm.runner import activation_profile, model_runner

    spec = tiny_model.spec
    bytes_per_block = spec.kv_bytes_per_token * 4 * 4
    kv_spec = model_runner.KVCacheSpec(num_blocks=12, block_size=4, bytes_per_block=bytes_per_block,
                                       dtype=torch.float32)
    runner = model_runner.ModelRunner(tiny_model, kv_spec, TorchReferenceBackend(), device=torch.device("cpu"), seed=0)
    monkeypatch.setattr(model_runner, "BLOCK_COPY_BYTES", 2 * bytes_per_block)
    assert activation_profile.BLOCK_COPY_BYTES > 2 * bytes_per_block  # (the patch is what bounds the chunks)
    runner.kv_cache.copy_(torch.randn_like(runner.kv_cache))
    before = runner.kv_cache.clone()
    pairs = [(0, 5), (1, 6), (2, 7), (5, 8), (3, 9)]
    runner._copy_blocks(pairs)
    expected = before.clone()
    for source, destination in pairs:
        expected[:, :, destination] = expected[:, :, source]
    assert torch.equal(runner.kv_cache, expected)
    assert torch.equal(runner.kv_cache[:, :, 8], before[:, :, 0])  # (5 took 0's bytes before 8 took 5's)


def test_block_tables_of_a_step_stay_within_the_reserved_bound(tiny_model):
    """The step's block table (`_BlockTables.gather`, as wide as its longest table) of as many sequences as the
    reserve counts, each at max_model_len, is what `block_table_bytes` reserves for it."""
    from batchllm.runner.model_runner import _BlockTables

    sequences, max_model_len, block_size = 37, 1000, 16
    blocks = -(-max_model_len // block_size)
    tables = _BlockTables(max_width=4096)
    for i in range(sequences):
        tables.update(f"r{i}", 0, list(range(blocks)))
    gathered = tables.gather([f"r{i}" for i in range(sequences)], blocks)
    assert gathered.nbytes == block_table_bytes(sequences, max_model_len, block_size)


class FakeCudaMemory:
    """torch.cuda's memory statistics for a CPU run of the probe: allocated bytes step up as the probe goes."""

    def __init__(self, readings: list[int]):
        self.readings = iter(readings)
        self.resets = 0

    def install(self, monkeypatch) -> None:
        from batchllm.runner import activation_profile

        cuda = activation_profile.torch.cuda
        monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 1000)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: next(self.readings))
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: setattr(self, "resets",
                                                                                           self.resets + 1))


def test_the_reserve_adds_the_measured_step_to_its_bounds(tiny_model, monkeypatch):
    """The whole probe on CPU with torch.cuda's statistics faked (forward peak 1000 + 600, step 1000 + 900): the
    reserve is the measured step, the attention bound, the block tables and the graphs' share of the forward."""
    from batchllm.runner.activation_profile import BLOCK_COPY_BYTES, measure_activation_reserve

    FakeCudaMemory([1600, 1900]).install(monkeypatch)
    spec = tiny_model.spec
    reserve = measure_activation_reserve(tiny_model, 64, 2**31, 5, graph_batch=16, max_model_len=64, block_size=16)
    assert reserve.step == 900 and reserve.graphs == 600 * 16 // 64
    assert reserve.attention == attention_workspace_bytes(64, spec.num_heads, spec.head_dim, spec.num_kv_heads)
    assert reserve.tables == block_table_bytes(64, 64, 16)
    assert reserve.total == BLOCK_COPY_BYTES + reserve.attention + reserve.tables + reserve.graphs  # (900 < a copy)


def test_running_out_of_memory_while_measuring_names_the_settings(tiny_model, monkeypatch):
    from batchllm.runner import activation_profile

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(activation_profile, "step_peak_bytes", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="one step of 64 tokens and up to 8 sampling rows before the KV "
                                                     "cache was sized .* lower max_num_batched_tokens, max_num_seqs "
                                                     "or max_logprobs"):
        activation_profile.measure_activation_reserve(tiny_model, 64, 8, 5, graph_batch=0, max_model_len=64,
                                                      block_size=16)
