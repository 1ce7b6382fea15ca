"""Tensor-parallel process layout: rank 0 is the engine's own process; ranks 1..size-1 are follower
processes it starts, each building the same runner over its shard and running rank 0's steps.

Devices: a TP group whose rank 0 is on cuda:B uses cuda:B .. cuda:B+size-1; on CPU every rank uses
the CPU (gloo). Followers die with their parent (PR_SET_PDEATHSIG on Linux) and are stopped by
`TensorParallelFollowers.stop`, so no rank outlives the job.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def rank_device(base: torch.device, rank: int) -> torch.device:
    if base.type != "cuda":
        return base
    return torch.device("cuda", (base.index or 0) + rank)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TensorParallelFollowers:
    processes: list

    def stop(self, runner, timeout_s: float = 60.0) -> None:
        """Tell the followers to leave their loops (through rank 0's channel), then join them."""
        try:
            runner.stop_followers()
        except Exception:  # noqa: BLE001 - a follower already gone: nothing to tell
            logger.exception("could not stop the tensor-parallel followers cleanly")
        for p in self.processes:
            p.join(timeout_s)
            if p.is_alive():
                p.kill()
        self.processes = []


def start_followers(size: int, build_args: tuple, base_device: torch.device) -> tuple[object, TensorParallelFollowers]:
    """Start ranks 1..size-1 and join the group as rank 0; returns (rank 0's TPGroup, the followers).

    build_args: what `build_rank_runner` needs besides the TP group (picklable)."""
    from batchllm.parallel.tensor_parallel import init_tp_group

    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    processes = []
    for rank in range(1, size):
        p = ctx.Process(target=_follower_main, args=(rank, size, init_method, build_args, base_device),
                        name=f"batchllm-tp{rank}", daemon=True)
        p.start()
        processes.append(p)
    tp = init_tp_group(0, size, init_method, rank_device(base_device, 0))
    return tp, TensorParallelFollowers(processes)


def _follower_main(rank: int, size: int, init_method: str, build_args: tuple, base_device: torch.device) -> None:
    _die_with_parent()
    from batchllm.parallel.tensor_parallel import destroy_tp_group, init_tp_group

    device = rank_device(base_device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tp = init_tp_group(rank, size, init_method, device)
    try:
        runner = build_rank_runner(*build_args, device=device, tp=tp)
        runner.follow()
    finally:
        destroy_tp_group()


def build_rank_runner(model_config, cache_config, spec, model_dir: Path, dtype, max_model_len: int,
                      max_graph_batch: int | None, *, device: torch.device, tp=None):
    """One rank's model shard, KV cache, attention backend, runner and decode graphs, built the same
    way on every rank (the graphs are captured by all ranks together: they hold collectives)."""
    from batchllm.attention import TorchReferenceBackend
    from batchllm.layers.ops import make_ops, use_triton
    from batchllm.models.loader import build_model
    from batchllm.runner.model_runner import ModelRunner, plan_kv_cache

    model = build_model(spec, model_dir, max_positions=max_model_len, dtype=dtype, device=device,
                        load_format="dummy" if model_config.load_format == "dummy" else "safetensors",
                        seed=model_config.seed, ops=make_ops(model_config.kernels, device), tp=tp)
    kv_spec = plan_kv_cache(model.spec, cache_config, dtype, device, tp)
    if use_triton(model_config.attention_backend, device, "attention_backend"):
        from batchllm.attention.triton_backend import TritonBackend

        backend = TritonBackend()
        local = model.spec
        backend.warmup(local.num_heads, local.num_kv_heads, local.head_dim, kv_spec.block_size, dtype, device)
    else:
        backend = TorchReferenceBackend()
    runner = ModelRunner(model, kv_spec, backend, device=device, dtype=dtype, seed=model_config.seed, tp=tp)
    if max_graph_batch and getattr(backend, "supports_decode_graphs", False):
        runner.setup_decode_graphs(max_graph_batch, max_model_len)
    return runner


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so a killed job leaves no rank behind."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
