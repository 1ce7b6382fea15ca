"""Build a `DecoderForCausalLM` and fill its weights: from *.safetensors, or random ("dummy").

The module is built on the meta device and materialised directly on the target device and dtype,
so an 8B-parameter shape never exists twice in memory. Under tensor parallelism each rank reads the
same files and keeps its slice of each tensor (`CheckpointTarget`); dummy weights are drawn whole
per checkpoint tensor (seeded by its name) and sliced the same way, so every tensor-parallel size
builds the same model.
"""

from __future__ import annotations

import logging
import math
import re
import zlib
from pathlib import Path

import torch

from batchllm.layers.rotary import RotaryEmbedding
from batchllm.models.decoder import DecoderForCausalLM
from batchllm.models.spec import ModelLoadError, ModelSpec

logger = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_KV_SCALE_NAME = re.compile(
    r"model\.layers\.(\d+)\.self_attn\.(k_scale|v_scale|kv_scale|k_proj\.output_scale|v_proj\.output_scale"
    r"|k_proj\.k_scale|v_proj\.v_scale)")
"""Per-tensor FP8 KV-cache scales as checkpoints name them (vLLM / compressed-tensors `self_attn.k_scale`,
AutoFP8 and Quark `k_proj.output_scale`, ModelOpt `k_proj.k_scale`, the older `kv_scale` for both)."""


def build_model(
    spec: ModelSpec,
    model_dir: Path,
    *,
    max_positions: int,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str,
    seed: int,
    ops=None,
    tp=None,
) -> DecoderForCausalLM:
    """ops: the elementwise-op policy (`layers/ops.py`), default TorchOps; tp: this rank's TPGroup."""
    with torch.device("meta"):
        model = DecoderForCausalLM(spec, max_positions, ops, tp)
    model = model.to(dtype).to_empty(device=device)  # dtype first: a 70B shard never exists in float32
    # The cos/sin table is a buffer, not a weight: compute it for real, in float32.
    model.model.rotary = RotaryEmbedding(spec.head_dim, max_positions, spec.rope_theta, spec.rope_scaling).to(device)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # KV-cache scales: 1.0 (vLLM's default without calibrated scales) unless the checkpoint has them
    model.set_kv_scales(torch.ones(spec.num_layers, 4, dtype=torch.float32, device=device))
    if load_format == "dummy":
        _fill_random(model, seed)
    else:
        _load_safetensors(model, model_dir)
    return model.eval()


_VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _full_shape(name: str, target, spec: ModelSpec) -> tuple[int, ...]:
    return target.full_shape(spec.vocab_size if name in _VOCAB_TENSORS else None)


def _fill_random(model: DecoderForCausalLM, seed: int) -> None:
    """Random weights drawn on the weights' own device (an 8B shape fills in seconds on a GPU): each
    checkpoint tensor whole, from a generator seeded by (seed, its name), then this rank's slice."""
    device = next(model.parameters()).device
    targets = model.checkpoint_tensors()
    if model.full_spec.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    with torch.no_grad():
        for name, target in targets.items():
            if name.endswith("norm.weight"):
                target.tensor.fill_(1.0)
            elif name.endswith(".bias"):
                target.tensor.zero_()
            else:
                generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                if target.size == 1:  # the target is the whole (contiguous) tensor: the same draws, in place
                    target.tensor.normal_(0.0, 0.02, generator=generator)
                    continue
                full = torch.empty(_full_shape(name, target, model.full_spec), dtype=target.tensor.dtype, device=device)
                target.load(full.normal_(0.0, 0.02, generator=generator))


def _load_safetensors(model: DecoderForCausalLM, model_dir: Path) -> None:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{str(model_dir)!r} holds no *.safetensors weights (use load_format='dummy' for random weights)"
        )
    params = model.checkpoint_tensors()
    loaded: set[str] = set()
    num_kv_scales = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    if (match := _KV_SCALE_NAME.fullmatch(name)) is not None:
                        _load_kv_scale(model, match, f.get_tensor(name), path.name)
                        num_kv_scales += 1
                        continue
                    if name not in params:
                        raise ModelLoadError(f"{path.name}: unexpected weight {name!r} for {model.spec.architecture}")
                    tensor = f.get_tensor(name)
                    target = params[name]
                    expected = _full_shape(name, target, model.full_spec)
                    if tuple(tensor.shape) != expected:
                        raise ModelLoadError(
                            f"{path.name}: weight {name!r} has shape {tuple(tensor.shape)}, "
                            f"config.json implies {expected}"
                        )
                    target.load(tensor)
                    loaded.add(name)
        except ModelLoadError:
            raise
        except Exception as e:  # a truncated or corrupt file: name it
            raise ModelLoadError(f"cannot read weights from {path}: {e}") from e
    missing = set(params) - loaded
    if model.full_spec.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ModelLoadError(f"{str(model_dir)!r} lacks weights: {', '.join(sorted(missing)[:5])}")
    logger.info("loaded %d tensors (and %d KV-cache scales) from %d file(s)", len(loaded), num_kv_scales, len(files))


def _load_kv_scale(model: DecoderForCausalLM, match: re.Match, tensor: torch.Tensor, file: str) -> None:
    """One layer's k_scale or v_scale (kv_scale: both) into `model.kv_scales`; a per-tensor scale
    (one value, the same on every tensor-parallel rank) that is finite and positive."""
    layer, kind = int(match.group(1)), match.group(2)
    if layer >= model.full_spec.num_layers:
        raise ModelLoadError(f"{file}: KV-cache scale {match.group(0)!r} for layer {layer}, but the model has "
                             f"{model.full_spec.num_layers} layers")
    if tensor.numel() != 1:
        raise ModelLoadError(f"{file}: KV-cache scale {match.group(0)!r} has shape {tuple(tensor.shape)}; only "
                             "per-tensor scales (one value) are supported")
    value = float(tensor.float().item())
    if not math.isfinite(value) or value <= 0:
        raise ModelLoadError(f"{file}: KV-cache scale {match.group(0)!r} is {value}; it must be finite and > 0")
    columns = (0, 1) if kind == "kv_scale" else (0,) if kind.startswith("k") else (1,)
    for column in columns:
        model.kv_scales[layer, column] = value
