"""Build a `DecoderForCausalLM` and fill its weights: from *.safetensors, or random ("dummy").

The module is built on the meta device and materialised directly on the target device and dtype,
so an 8B-parameter shape never exists twice in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from batchllm.layers.rotary import RotaryEmbedding
from batchllm.models.decoder import DecoderForCausalLM
from batchllm.models.spec import ModelLoadError, ModelSpec

logger = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
) -> DecoderForCausalLM:
    """ops: the elementwise-op policy (`layers/ops.py`), default TorchOps."""
    with torch.device("meta"):
        model = DecoderForCausalLM(spec, max_positions, ops)
    model = model.to_empty(device=device).to(dtype)
    # The cos/sin table is a buffer, not a weight: compute it for real, in float32.
    model.model.rotary = RotaryEmbedding(spec.head_dim, max_positions, spec.rope_theta, spec.rope_scaling).to(device)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if load_format == "dummy":
        _fill_random(model, seed)
    else:
        _load_safetensors(model, model_dir)
    return model.eval()


def _fill_random(model: DecoderForCausalLM, seed: int) -> None:
    """Random weights drawn on the weights' own device (an 8B shape fills in seconds on a GPU)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=generator)


def _load_safetensors(model: DecoderForCausalLM, model_dir: Path) -> None:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{str(model_dir)!r} holds no *.safetensors weights (use load_format='dummy' for random weights)"
        )
    params = model.checkpoint_tensors()
    loaded: set[str] = set()
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    if name not in params:
                        raise ModelLoadError(f"{path.name}: unexpected weight {name!r} for {model.spec.architecture}")
                    tensor = f.get_tensor(name)
                    target = params[name]
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise ModelLoadError(
                            f"{path.name}: weight {name!r} has shape {tuple(tensor.shape)}, "
                            f"config.json implies {tuple(target.shape)}"
                        )
                    with torch.no_grad():
                        target.copy_(tensor)
                    loaded.add(name)
        except ModelLoadError:
            raise
        except Exception as e:  # a truncated or corrupt file: name it
            raise ModelLoadError(f"cannot read weights from {path}: {e}") from e
    missing = set(params) - loaded
    if model.spec.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ModelLoadError(f"{str(model_dir)!r} lacks weights: {', '.join(sorted(missing)[:5])}")
    logger.info("loaded %d tensors from %d file(s)", len(loaded), len(files))
