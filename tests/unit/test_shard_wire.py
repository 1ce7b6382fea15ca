"""The packed form of a data-parallel shard (`parallel/shard_wire.py`): what crosses the pipe comes
back as it went, through a real pickle round trip."""

import pickle

import numpy as np
import pytest

from batchllm.parallel.shard_wire import PackedItems, pack_items
from batchllm.prefix.radix import as_token_array
from batchllm.sampling_params import SamplingParams


def _round_trip(packed: PackedItems) -> PackedItems:
    return pickle.loads(pickle.dumps(packed, protocol=pickle.HIGHEST_PROTOCOL))


def test_round_trip_keeps_indices_tokens_and_params_in_order():
    a, b = SamplingParams(max_tokens=3), SamplingParams(temperature=0.5, n=2)
    prompts = [[5, 6, 7], np.array([1, 2], dtype=np.int32), [9] * 1000, np.arange(10, dtype=np.int64)]
    packed = _round_trip(pack_items([7, 0, 3, 12], prompts, [a, b, a, b]))
    assert packed.tokens.dtype == np.int32 and packed.num_tokens == 1015 and len(packed) == 4
    items = packed.unpack()
    assert [i for i, _, _ in items] == [7, 0, 3, 12]
    assert [t.tolist() for _, t, _ in items] == [list(p) for p in prompts]
    assert [sp.max_tokens for _, _, sp in items] == [3, 16, 3, 16] and items[1][2].n == 2
    assert items[0][2] is items[2][2]  # one params object shared by many prompts stays one


def test_empty_prompt_and_empty_shard():
    items = _round_trip(pack_items([4, 5], [[], [1]], [None, None])).unpack()
    assert [(i, t.tolist()) for i, t, _ in items] == [(4, []), (5, [1])]
    empty = _round_trip(pack_items([], [], []))
    assert len(empty) == 0 and empty.unpack() == []


def test_large_ids_keep_their_value():
    big = [2**31 - 1, 0, 2**31 - 2]
    packed = _round_trip(pack_items([0], [big], [None]))
    assert packed.tokens.dtype == np.int32 and packed.unpack()[0][1].tolist() == big
    bigger = [2**31, 5, 2**40]  # past int32: the shard is sent as int64 rather than wrapped
    packed = _round_trip(pack_items([0, 1], [bigger, [1]], [None, None]))
    assert packed.tokens.dtype == np.int64 and [t.tolist() for _, t, _ in packed.unpack()] == [bigger, [1]]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="negative token id -1"):
        pack_items([0], [[3, -1]], [None])
    with pytest.raises(ValueError, match="2 indices, 1 prompts and 2 params"):
        pack_items([0, 1], [[1]], [None, None])


def test_as_token_array_keeps_arrays_and_converts_lists_once():
    array = np.array([1, 2, 3], dtype=np.int32)
    assert as_token_array(array) is array
    assert as_token_array([1, 2]).dtype == np.int64
