"""A tensor-parallel engine's process group against one the caller made: the engine refuses to start beside the
caller's group, saying so, and never tears it down."""

import pytest
import torch.distributed as dist

from batchllm.parallel.tensor_parallel import destroy_tp_group, refuse_existing_group
from batchllm.parallel.tp_worker import free_port


@pytest.fixture
def callers_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_callers_group_is_named_as_the_callers(callers_group):
    with pytest.raises(RuntimeError, match=r"made outside batchllm.*destroy_process_group\(\)"):
        refuse_existing_group()


def test_destroying_the_engines_group_leaves_the_callers(callers_group):
    assert destroy_tp_group(wait_s=5.0)
    assert dist.is_initialized() and dist.group.WORLD is callers_group
