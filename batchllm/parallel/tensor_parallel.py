"""Tensor parallelism (Megatron style) for the Llama-family decoder: the process group and the shapes.

Each of `size` ranks holds 1/size of every layer's query and KV heads (q/k/v column-parallel, by
head), of the MLP's intermediate rows (gate/up column-parallel), the matching input columns of
o_proj and down_proj (row-parallel: one all-reduce each per layer), and 1/size of the vocabulary
(embedding and LM head; the vocabulary is padded up to a multiple of size). Norms and rotary tables
are replicated. The KV cache of a rank holds its own KV heads only.

A rank's model is the ordinary decoder built from `shard_spec(spec, size)` (its local head counts
and intermediate size) plus the `TPGroup`, so the runner, the attention backends and the CUDA graphs
work unchanged on the local shapes.

Two process groups: `device_group` for tensors on the model's device (NCCL on CUDA, gloo on CPU)
and `host_group` (gloo) for the step messages rank 0 sends (`step_channel.py`). The followers wait for the next
step in the host group, however long the LLM stays idle: its timeout is `STEP_WAIT_TIMEOUT_S`, not the device
group's `collective_timeout_s` (with one group, a follower left 30 minutes without a step timed out and exited).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from batchllm.models.spec import ModelLoadError, ModelSpec

STEP_WAIT_TIMEOUT_S = 7 * 24 * 3600.0
"""How long a follower waits for rank 0's next step (an idle LLM: a notebook left alone, a suspended call) before it
gives up: a week, in gloo's milliseconds well inside 32 bits. A dead rank 0 ends the wait at once (its connection
closes)."""


def collective_timeout_s() -> float:
    """The device group's timeout: a collective of a step that takes longer fails (BATCHLLM_TP_COLLECTIVE_TIMEOUT_S,
    default 1800 s, as vLLM's and torch's default process groups)."""
    text = os.environ.get("BATCHLLM_TP_COLLECTIVE_TIMEOUT_S", "1800")
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < STEP_WAIT_TIMEOUT_S:  # (NaN too)
        raise ValueError(f"BATCHLLM_TP_COLLECTIVE_TIMEOUT_S must be a number of seconds above 0 and below "
                         f"{STEP_WAIT_TIMEOUT_S:.0f}, got {text[:40]!r}")
    return seconds

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
"""torch 2.13's name (its all_gather_into_tensor warns that it is deprecated); the older one before."""


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    device_group: Any
    """Process group for collectives on the model's device."""
    host_group: Any
    """gloo process group for host tensors (the step messages)."""

    @property
    def is_driver(self) -> bool:
        """Rank 0 plans, schedules and samples; the others follow its steps."""
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self.device_group)
        return tensor

    def all_gather_last_dim(self, local: torch.Tensor) -> torch.Tensor:
        """[n, k] on each rank -> [n, size * k] (rank r's columns at r*k .. (r+1)*k) on every rank."""
        n, k = local.shape
        gathered = torch.empty(self.size * n, k, dtype=local.dtype, device=local.device)  # rank-major
        _all_gather_single(gathered, local.contiguous(), group=self.device_group)
        return gathered.view(self.size, n, k).permute(1, 0, 2).reshape(n, self.size * k)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor into every rank's (same shape and dtype), on the device group."""
        dist.broadcast(tensor, src=0, group=self.device_group)
        return tensor


def shard_spec(spec: ModelSpec, size: int) -> ModelSpec:
    """The spec of one rank's shard: local query/KV heads and intermediate size. KV heads fewer than the ranks
    are replicated, one per rank (`kv_shard`), as vLLM replicates them, where the ranks are a multiple of them.
    Raises a ModelLoadError naming the count that does not divide."""
    if size == 1:
        return spec
    kv_split = spec.num_kv_heads % size == 0 or size % spec.num_kv_heads == 0
    for name, value, fits in (("num_attention_heads", spec.num_heads, spec.num_heads % size == 0),
                              ("num_key_value_heads", spec.num_kv_heads, kv_split),
                              ("intermediate_size", spec.intermediate_size, spec.intermediate_size % size == 0)):
        if not fits:
            raise ModelLoadError(
                f"tensor_parallel_size {size} does not divide the model's {name} ({value}); "
                f"choose a size that divides {spec.num_heads} query heads and intermediate size "
                f"{spec.intermediate_size}, and divides or is a multiple of its {spec.num_kv_heads} KV heads"
            )
    return dataclasses.replace(spec, num_heads=spec.num_heads // size, num_kv_heads=max(1, spec.num_kv_heads // size),
                               intermediate_size=spec.intermediate_size // size)


def kv_shard(num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """(block, blocks): the block of a K or V projection's rows that `rank` of `size` holds, of how many equal
    blocks: its own of `size` where they divide the KV heads; else the one KV head it serves of `num_kv_heads`, each
    replicated on size / num_kv_heads consecutive ranks (vLLM's layout)."""
    if num_kv_heads % size == 0:
        return rank, size
    return rank // (size // num_kv_heads), num_kv_heads


def local_vocab_size(vocab_size: int, size: int) -> int:
    """Vocabulary rows per rank (the last rank's tail past vocab_size is padding)."""
    return -(-vocab_size // size)


_created: list = []
"""The default process group `init_tp_group` made in this process while it lives (one at most): the only group
`destroy_tp_group` tears down, and how `refuse_existing_group` tells an engine's group from the caller's."""


def refuse_existing_group() -> None:
    """Raise RuntimeError where this process already has a default process group, which a tensor-parallel engine
    needs for its own, saying whose: another engine's (shut that LLM down first) or one the caller made with
    torch.distributed (destroy it first, or build the LLM in another process). Nothing is changed either way."""
    if not dist.is_initialized():
        return
    if _created and _created[0] is dist.group.WORLD:
        raise RuntimeError("a tensor-parallel engine is already running in this process (one per process: "
                           "call shutdown() on the other LLM first)")
    raise RuntimeError(
        f"torch.distributed already has a default process group in this process ({dist.get_backend()}, world size "
        f"{dist.get_world_size()}), made outside batchllm; tensor_parallel_size > 1 needs its own: call "
        "torch.distributed.destroy_process_group() before building the LLM, or build it in another process")


def init_tp_group(rank: int, size: int, init_method: str, device: torch.device) -> TPGroup:
    """Join the tensor-parallel process group (this process's default group, which must not exist yet:
    `refuse_existing_group`) as `rank`, with its own gloo group for the step messages (`STEP_WAIT_TIMEOUT_S`)."""
    import datetime

    refuse_existing_group()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast: off (see the device notes)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, world_size=size, rank=rank,
                            timeout=datetime.timedelta(seconds=collective_timeout_s()), **kwargs)
    _created[:] = [dist.group.WORLD]
    host_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=STEP_WAIT_TIMEOUT_S))
    return TPGroup(rank, size, dist.group.WORLD, host_group)


def destroy_tp_group(wait_s: float = 15.0) -> bool:
    """Tear down the group `init_tp_group` made; True if it was, or if there is none (a default group this
    process has from elsewhere, the caller's own, is left as it is). NCCL's teardown waits for every rank's, so
    it runs in a thread and is abandoned after `wait_s` (seen hanging on an H200 pair with graphs alive): the
    process then keeps the group, and another tensor-parallel engine in it is refused by name."""
    if not dist.is_initialized() or not _created or _created[0] is not dist.group.WORLD:
        _created.clear()
        return True
    import threading

    done = threading.Event()

    def destroy() -> None:
        dist.destroy_process_group()
        _created.clear()
        done.set()

    threading.Thread(target=destroy, daemon=True, name="batchllm-tp-teardown").start()
    return done.wait(wait_s)
