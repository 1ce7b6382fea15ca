"""Host-to-device copies that never make the host wait for the device.

A copy from pageable host memory synchronizes with the stream: the host waits until every queued
kernel has run. With asynchronous scheduling that would stall the CPU on the step in flight, so
every per-step copy goes through pinned memory, non-blocking. (Torch keeps each pinned buffer out
of reuse until its copy has run.)
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A numpy array or a list of numbers on `device`, without waiting for queued device work."""
    host = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
    if dtype is not None and host.dtype != dtype:
        host = host.to(dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_into(target: torch.Tensor, values: np.ndarray) -> None:
    """Copy a numpy array into an existing device tensor of its shape (a buffer at a fixed address,
    e.g. a CUDA graph's input; a strided view is fine), without waiting for queued device work."""
    host = torch.from_numpy(values)
    if target.device.type == "cuda":
        host = host.pin_memory()
    target.copy_(host, non_blocking=target.device.type == "cuda")


def aligned_offsets(sizes: list[int], dtype) -> list[int]:
    """Where arrays of these lengths start when laid end to end in one buffer of `dtype`, each
    16-byte aligned; the last entry is the buffer's length. Triton compiles a kernel variant per
    pointer alignment, so an array at an odd offset in one step and an even one in the next would
    cost a second variant."""
    align = 16 // np.dtype(dtype).itemsize
    return np.cumsum([0] + [-(-size // align) * align for size in sizes]).tolist()


def to_device_packed(arrays: list, device: torch.device, dtype=np.int64) -> list[torch.Tensor]:
    """Integer arrays to the device in one copy (as `to_device`), returned as views of one buffer
    that each start 16-byte aligned (`aligned_offsets`)."""
    sizes = [len(a) for a in arrays]
    starts = aligned_offsets(sizes, dtype)
    host = np.zeros(starts[-1], dtype=dtype)
    for array, start, size in zip(arrays, starts, sizes):
        host[start:start + size] = array
    flat = to_device(host, device)
    return [flat[start:start + size] for start, size in zip(starts, sizes)]
