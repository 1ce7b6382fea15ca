import pytest

from batchllm.core.block_pool import BlockPool, NoFreeBlocksError
from batchllm.core.kv_cache_manager import KVCacheManager


def test_allocation_is_fifo_and_free_appends_to_the_back():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    pool.free([1, 0])
    # 3 was never used, then the freed blocks in the order they were freed
    assert pool.allocate(3) == [3, 1, 0]
    assert pool.num_free_blocks == 0


def test_exhaustion_is_all_or_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1


def test_shared_block_returns_to_pool_only_after_last_reference():
    pool = BlockPool(2)
    [b] = pool.allocate(1)
    pool.share([b])
    assert pool.ref_count(b) == 2
    pool.free([b])
    assert pool.ref_count(b) == 1 and pool.num_free_blocks == 1
    pool.free([b])
    assert pool.ref_count(b) == 0 and pool.num_free_blocks == 2


def test_double_free_and_sharing_a_free_block_are_errors():
    pool = BlockPool(2)
    with pytest.raises(ValueError):
        pool.free([0])
    with pytest.raises(ValueError):
        pool.share([1])


def test_kv_manager_grows_tables_by_block_and_frees_everything():
    kv = KVCacheManager(num_blocks=5, block_size=4)
    assert kv.allocate_slots("a", 5)  # 2 blocks
    assert kv.block_table("a") == [0, 1]
    assert kv.allocate_slots("a", 8)  # still 2 blocks
    assert kv.block_table("a") == [0, 1]
    assert kv.allocate_slots("a", 9)
    assert kv.block_table("a") == [0, 1, 2]
    assert kv.allocate_slots("b", 8)
    assert kv.block_table("b") == [3, 4]
    assert not kv.allocate_slots("c", 1)  # exhausted: no change, no table
    assert kv.block_table("c") == []
    assert not kv.allocate_slots("a", 13)  # growth that does not fit leaves the table as it was
    assert kv.block_table("a") == [0, 1, 2]
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == 5
    assert kv.allocate_slots("c", 20)
    assert kv.block_table("c") == [0, 1, 2, 3, 4]  # freed in table order, reused FIFO
