"""Which step a profiled kernel belonged to: each step's device work is marked, while a profile
asks for it (`ModelRunner.annotate_steps`), by a host range named `STEP_ANNOTATION` + its kind and,
on CUDA, by an empty marker kernel launched first, whose name says the kind.

Host ranges place host ops (on CPU, the work itself); they do not place kernels launched outside
torch's ops (Triton's) or replayed from a CUDA graph. The device runs one stream in order, so every
kernel from one marker to the next belongs to that marker's step (`kernels_by_step_kind`).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from batchllm.outputs import ScheduledBatch

STEP_ANNOTATION = "batchllm step: "
"""Prefix of the host range around each marked step's device work."""
STEP_KINDS = ("decode", "prefill")
MARKER_KERNELS = {kind: f"_{kind}_step_marker" for kind in STEP_KINDS}
"""The marker kernel's name per step kind (the Triton functions' names below)."""


def step_kind(batch: ScheduledBatch) -> str:
    """"decode" when every request of the step computes one token, else "prefill" (the step has
    prompt tokens, possibly mixed with decode rows)."""
    return "decode" if batch.num_tokens == batch.num_seqs else "prefill"


def mark_step(batch: ScheduledBatch, device: torch.device) -> contextlib.AbstractContextManager:
    """Launch the step's marker kernel (CUDA) and return the host range to run its work in."""
    kind = step_kind(batch)
    if device.type == "cuda":
        _marker_kernels()[kind][(1,)]()
    return torch.profiler.record_function(STEP_ANNOTATION + kind)


def kernels_by_step_kind(kernels: list[tuple[str, float, float]]) -> dict[str, list[tuple[str, float]]]:
    """Given a profile's kernels of one stream as (name, start, duration), the (name, duration) of
    those run in each kind of step: from a marker kernel up to the next marker. Kernels before the
    first marker belong to no step; markers themselves are left out."""
    kind_of_marker = {name: kind for kind, name in MARKER_KERNELS.items()}
    by_kind: dict[str, list[tuple[str, float]]] = {}
    current = None
    for name, _, duration in sorted(kernels, key=lambda k: k[1]):
        if name in kind_of_marker:
            current = by_kind.setdefault(kind_of_marker[name], [])
        elif current is not None:
            current.append((name, duration))
    return by_kind


@functools.cache
def _marker_kernels() -> dict:
    """The Triton marker kernels (empty; compiled on first use), by step kind."""
    import triton

    @triton.jit
    def _decode_step_marker():
        pass

    @triton.jit
    def _prefill_step_marker():
        pass

    kernels = {"decode": _decode_step_marker, "prefill": _prefill_step_marker}
    assert {k: f.fn.__name__ for k, f in kernels.items()} == MARKER_KERNELS
    return kernels
