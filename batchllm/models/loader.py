"""Build a `DecoderForCausalLM` and fill its weights: from *.safetensors, or random ("dummy").

The module is built on the meta device and materialised directly on the target device and dtype,
so an 8B-parameter shape never exists twice in memory. Under tensor parallelism each rank reads the
same files and keeps its slice of each tensor (`CheckpointTarget`); dummy weights are drawn whole
per checkpoint tensor (seeded by its name) and sliced the same way, so every tensor-parallel size
builds the same model.

With an FP8 scheme the decoder's linear layers hold float8 weights and per-channel scales
(`layers/fp8.py`): each checkpoint weight is converted whole (quantized, or its checkpoint scales
mapped to per-channel ones) and then sliced, one tensor at a time, so no 16-bit copy of the model
is ever held.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import zlib
from pathlib import Path

import torch
from torch import nn

from batchllm.layers.fp8 import FP8, channel_quantized, dequantized, prepare_fp8, restore_fp8_dtypes
from batchllm.layers.rotary import RotaryEmbedding
from batchllm.models.decoder import DecoderForCausalLM
from batchllm.models.quant_config import Fp8Scheme
from batchllm.models.spec import ModelLoadError, ModelSpec, weight_files

logger = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
"""Rotary tables some trainers store (ColossalAI's cos/sin caches): recomputed here, skipped as vLLM skips them."""

_WEIGHT_SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv")
"""Names of an FP8 weight's dequantization scale (`<module>.<suffix>`): the scheme's own first, then these."""
_SCALE_SUFFIXES = (*_WEIGHT_SCALE_SUFFIXES, "input_scale")
"""Every scale an FP8 module may carry in a checkpoint (all read with the weight, never on their own)."""

_KV_SCALE_NAME = re.compile(
    r"model\.layers\.(\d+)\.self_attn\.(?:attn\.|qkv_proj\.)?(k_scale|v_scale|kv_scale|k_proj\.output_scale"
    r"|v_proj\.output_scale|k_proj\.k_scale|v_proj\.v_scale|k_cache\.scale|v_cache\.scale)")
"""Per-tensor FP8 KV-cache scales as checkpoints name them (vLLM / compressed-tensors `self_attn.k_scale`, vLLM's
own `self_attn.attn.k_scale`, AutoFP8 and Quark `k_proj.output_scale`, ModelOpt `k_proj.k_scale` or, fused,
`qkv_proj.k_scale`, `k_cache.scale`, the older `kv_scale` for both: vLLM's `get_cache_scale_mapper`)."""
_UNUSED_ATTENTION_SCALE = re.compile(
    r"model\.layers\.\d+\.self_attn\.(?:attn\.)?(q_scale|prob_scale|prob_output_scale|q_proj\.output_scale)")
"""Calibrated scales of the attention's queries and probabilities (compressed-tensors, Quark; vLLM loads them for
its FP8-query backends): skipped, as the attention here quantizes neither."""


def _uninitialized_on(model: nn.Module, device: torch.device) -> nn.Module:
    """`model.to_empty(device=device)`: every parameter and buffer uninitialized on `device`, through the same
    `Module._apply` (so parameters are replaced exactly as to_empty replaces them), but made by `torch.empty`:
    to_empty's `empty_like` of a meta tensor runs torch's reference implementation, whose first call imports
    sympy (seconds of every engine's start). The model's tensors are contiguous, so the layouts are the same."""
    return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def build_model(spec: ModelSpec, model_dir: Path, *, max_positions: int, dtype: torch.dtype, device: torch.device,
                load_format: str, ops=None, tp=None,
                quantization: Fp8Scheme | None = None, fp8_fused_quant: bool = False,
                fp8_deferred_scales: bool = False) -> DecoderForCausalLM:
    """ops: the elementwise-op policy (`layers/ops.py`), default TorchOps; tp: this rank's TPGroup;
    quantization: the FP8 scheme the decoder's linear layers run with (None: the model dtype);
    fp8_fused_quant: the norms and SiLU hand FP8 layers their input quantized; fp8_deferred_scales:
    decode-sized FP8 matmuls hand their scales to the op after them (both `fp8.prepare_fp8`)."""
    fp8_layers = quantization is not None and not quantization.weight_only  # (weight-only: dequantized at load)
    with torch.device("meta"):
        model = DecoderForCausalLM(spec, ops, tp, fp8=fp8_layers)
        if fp8_layers and (kept := model.keep_in_model_dtype(quantization.quantizes)):
            logger.info("%d linear layers stay in %s: the checkpoint's %s leaves them out", kept, dtype,
                        quantization.config_key)
    model = model.to(dtype)  # dtype first: a 70B shard never exists in float32
    restore_fp8_dtypes(model)  # .to(dtype) cast the float8 weights and float32 scales too
    model = _uninitialized_on(model, device)
    # The cos/sin table is a buffer, not a weight: compute it for real, in float32.
    model.model.rotary = RotaryEmbedding(spec.head_dim, max_positions, spec.rope_theta, spec.rope_scaling).to(device)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # KV-cache scales: 1.0 (vLLM's default without calibrated scales) unless an FP8 model's checkpoint has them
    model.set_kv_scales(torch.ones(spec.num_layers, 4, dtype=torch.float32, device=device))
    if load_format == "dummy":
        _fill_random(model)
    else:
        _load_safetensors(model, model_dir, quantization)
    prepare_fp8(model, device, model.ops, fp8_fused_quant, fp8_deferred_scales)
    return model.eval()


def warn_unit_kv_scales(model: DecoderForCausalLM, kv_cache_dtype: str, quantization: Fp8Scheme | None) -> bool:
    """Log vLLM's warning, once for the model, where an FP8 model (`quantization`: a checkpoint's scheme or
    quantization='fp8', whose config gives vLLM's attention its KV-cache scales) runs an fp8 (e4m3) KV cache with a
    layer whose k and v scales are both 1.0: the checkpoint has none for it (a kv_cache_scheme without k/v_scale
    tensors, say), as vLLM's `BaseKVCacheMethod.process_weights_after_loading` warns. Whether it warned."""
    if quantization is None or kv_cache_dtype not in ("fp8", "fp8_e4m3"):
        return False
    unit = (model.kv_scales[:, 0] == 1.0) & (model.kv_scales[:, 1] == 1.0)
    if not bool(unit.any()):
        return False
    logger.warning("Using KV cache scaling factor 1.0 for fp8_e4m3 in %d of %d layers. If this is unintended, verify "
                   "that k/v_scale scaling factors are properly set in the checkpoint.", int(unit.sum()), len(unit))
    return True


_VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _full_shape(name: str, target, spec: ModelSpec) -> tuple[int, ...]:
    return target.full_shape(spec.vocab_size if name in _VOCAB_TENSORS else None)


def _fp8_scale_targets(targets: dict) -> dict:
    """Take the per-channel scale target of every float8 weight out of `targets`: weight name ->
    its scale's target. A scale is not read from the checkpoint under its own name; it is written
    together with its weight (`channel_quantized`)."""
    scales = {}
    for name in [n for n in targets if n.endswith(".weight_scale")]:
        weight = name[: -len("_scale")]
        if weight in targets and targets[weight].tensor.dtype == FP8:
            scales[weight] = targets.pop(name)
    return scales


def _load_fp8(target, scale_target, weight: torch.Tensor, scale: torch.Tensor | None, scheme: Fp8Scheme | None) -> None:
    """Write one checkpoint weight (16/32-bit, or float8 with its checkpoint scale) and its
    per-channel scales; the conversion runs on the weights' device."""
    device = target.tensor.device
    strategy, block = (scheme.weight_strategy, scheme.block_size) if scheme is not None else ("channel", None)
    q, s = channel_quantized(weight.to(device), None if scale is None else scale.to(device), strategy, block)
    target.load(q)
    scale_target.load(s)


def _fill_random(model: DecoderForCausalLM) -> None:
    """Random weights drawn on the weights' own device (an 8B shape fills in seconds on a GPU): each
    checkpoint tensor whole, from a generator seeded by its name alone (as vLLM seeds its dummy weights with one fixed
    seed: every engine and rank of a job gets the same model, whatever seed each samples with), then this rank's
    slice.
    A float8 weight is drawn in the model dtype (the same draws as unquantized) and quantized, one
    tensor at a time."""
    device = next(model.parameters()).device
    dtype = model.model.embed_tokens.weight.dtype
    targets = model.checkpoint_tensors()
    scales = _fp8_scale_targets(targets)
    if model.full_spec.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    with torch.no_grad():
        for name, target in targets.items():
            if name.endswith("norm.weight"):
                target.tensor.fill_(1.0)
            elif name.endswith(".bias"):
                target.tensor.zero_()
            else:
                generator = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
                if target.size == 1 and name not in scales:  # the whole (contiguous) tensor: the same draws, in place
                    target.tensor.normal_(0.0, 0.02, generator=generator)
                    continue
                full = torch.empty(_full_shape(name, target, model.full_spec), dtype=dtype, device=device)
                full.normal_(0.0, 0.02, generator=generator)
                if name in scales:
                    _load_fp8(target, scales[name], full, None, None)
                else:
                    target.load(full)


def _load_safetensors(model: DecoderForCausalLM, model_dir: Path, scheme: Fp8Scheme | None) -> None:
    from safetensors import safe_open

    files = weight_files(model_dir)
    params = model.checkpoint_tensors()
    scales = _fp8_scale_targets(params)
    loaded: set[str] = set()
    with contextlib.ExitStack() as stack:
        index: dict[str, tuple[Path, object]] = {}  # checkpoint name -> (its file, the open file)
        for path in files:
            try:
                f = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as e:  # a truncated or corrupt file: name it
                raise ModelLoadError(f"cannot read weights from {path}: {e}") from e
            index.update((name, (path, f)) for name in f.keys())
        companions = _scale_names(index, scales, scheme, model_dir)
        kv_scales: dict[int, dict[int, float]] = {}  # layer -> {0: k_scale, 1: v_scale} as the checkpoint gives them
        unloaded: list[str] = []  # the KV-cache scales of a model that is not FP8 (not loaded, as in vLLM)
        tied = model.full_spec.tie_word_embeddings
        for name, (path, f) in index.items():
            if name.endswith(_IGNORED_SUFFIXES) or name in companions or (tied and name == "lm_head.weight"):
                continue  # (tied: the head is the embedding, as vLLM skips a stored head, whatever its file's order)
            if (match := _KV_SCALE_NAME.fullmatch(name)) is not None:
                if scheme is None:  # vLLM's attention has no KV-cache method to load it into: 1.0
                    unloaded.append(name)
                    continue
                if scheme.kv_cache_per_head:  # (such a cache runs unquantized: `Fp8Scheme.kv_cache_per_head`)
                    continue
                layer, columns, value = _read_kv_scale(model, match, f.get_tensor(name), path.name)
                kv_scales.setdefault(layer, {}).update(dict.fromkeys(columns, value))
                continue
            if _UNUSED_ATTENTION_SCALE.fullmatch(name):
                continue
            if name not in params:
                if scheme is None and name.endswith(_SCALE_SUFFIXES):
                    raise ModelLoadError(f"{path.name}: {name!r} is an FP8 scale but config.json has no FP8 "
                                         f"quantization_config")
                raise ModelLoadError(f"{path.name}: unexpected weight {name!r} for {model.spec.architecture}")
            try:
                _load_one(name, path, f, params[name], scales.get(name), index, scheme, model.full_spec)
            except ModelLoadError:
                raise
            except Exception as e:  # a truncated or corrupt file: name it
                raise ModelLoadError(f"cannot read weight {name!r} from {path}: {e}") from e
            loaded.add(name)
        if tied:
            _note_untied_stored_head(index)
    _set_kv_scales(model, kv_scales, unloaded)
    missing = set(params) - loaded
    if tied:
        missing.discard("lm_head.weight")
    if missing:
        raise ModelLoadError(f"{str(model_dir)!r} lacks weights: {', '.join(sorted(missing)[:5])}")
    logger.info("loaded %d tensors (and the KV-cache scales of %d layers) from %d file(s)%s", len(loaded),
                len(kv_scales), len(files),
                "" if scheme is None else f", {scheme.describe()}")



def _note_untied_stored_head(index: dict[str, tuple[Path, object]]) -> None:
    """Warn where a tied model's checkpoint also stores an `lm_head.weight` other than its embedding: the head used
    is the embedding, as in vLLM, where transformers would use the stored head (and says so)."""
    if "lm_head.weight" not in index or "model.embed_tokens.weight" not in index:
        return
    (head_path, head_file), (_, embedding_file) = index["lm_head.weight"], index["model.embed_tokens.weight"]
    if not torch.equal(head_file.get_tensor("lm_head.weight"), embedding_file.get_tensor("model.embed_tokens.weight")):
        logger.warning("%s stores an lm_head.weight that differs from the embedding, but config.json ties them "
                       "(tie_word_embeddings): the embedding is the head here, as in vLLM; transformers would use "
                       "the stored head. Set tie_word_embeddings to false to use it.", head_path.name)


def _scale_names(index: dict, scales: dict, scheme: Fp8Scheme | None, model_dir: Path) -> set[str]:
    """The checkpoint's scale tensors of FP8 weights (read with their weight, never on their own): those of the
    FP8 layers' weights (`scales`' keys), or under a weight-only scheme every weight's, which it dequantizes.
    A pre-quantized checkpoint with static activation scales must carry every `input_scale`."""
    if scheme is not None and scheme.weight_only:
        return {name for name in index if name.endswith(_SCALE_SUFFIXES)
                and f"{name.rpartition('.')[0]}.weight" in index}
    names = set()
    for weight in scales:
        module = weight[: -len(".weight")]
        names.update(f"{module}.{suffix}" for suffix in _SCALE_SUFFIXES if f"{module}.{suffix}" in index)
        if scheme is not None and scheme.static_input and f"{module}.input_scale" not in index:
            raise ModelLoadError(f"{str(model_dir)!r}: {scheme.config_key} asks for static activation scales "
                                 f"but {module}.input_scale is missing")
    return names


def _load_one(name: str, path: Path, f, target, scale_target, index: dict, scheme: Fp8Scheme | None,
              full_spec: ModelSpec) -> None:
    """Load checkpoint tensor `name` (from the open file `f`) into `target`, checking its shape
    against config.json. With a `scale_target` the layer is FP8: a 16/32-bit weight is quantized, a
    float8 one comes with its scale (found in `index`, any file) and both are converted to the
    run-time layout. A weight-only scheme's float8 weights are dequantized with their scales into their
    16/32-bit layers. A float8 weight anywhere else is refused by name, as is a weight of any other type
    than a float (float8: e4m3fn only), or a 16/32-bit weight that comes with a scale (its scale would be lost)."""
    tensor = f.get_tensor(name)
    expected = _full_shape(name, target, full_spec)
    if tuple(tensor.shape) != expected:
        raise ModelLoadError(f"{path.name}: weight {name!r} has shape {tuple(tensor.shape)}, "
                             f"config.json implies {expected}")
    _check_weight_dtype(name, tensor, index, path)
    if tensor.dtype == FP8 and (scheme is None or not scheme.checkpoint_fp8):
        raise ModelLoadError(f"{path.name}: weight {name!r} is float8 but config.json has no FP8 quantization_config")
    if scale_target is None and not (tensor.dtype == FP8 and scheme.weight_only):
        if tensor.dtype == FP8:
            raise ModelLoadError(f"{path.name}: weight {name!r} is float8 but this layer is not quantized")
        target.load(tensor)
        return
    scale = _weight_scale(name, index, scheme, path) if tensor.dtype == FP8 else None
    try:
        if scale_target is None:  # weight-only: the 16/32-bit layer takes the weight its scales give
            target.load(dequantized(tensor, scale, scheme.weight_strategy, scheme.block_size))
        else:
            _load_fp8(target, scale_target, tensor, scale, scheme)
    except ValueError as e:
        raise ModelLoadError(f"{path.name}: weight {name!r}: {e}") from e


def _check_weight_dtype(name: str, tensor: torch.Tensor, index: dict, path: Path) -> None:
    """Refuse (ModelLoadError naming the weight and its type) a weight no layer can take as it is: not a float, a
    float8 other than e4m3fn (e5m2, the fnuz types), or a 16/32-bit weight stored beside a weight scale, whose
    values only that scale gives (an FP8 checkpoint's weights must be stored as float8_e4m3fn)."""
    if tensor.dtype == FP8:
        return
    dtype = str(tensor.dtype).removeprefix("torch.")
    if not tensor.dtype.is_floating_point or tensor.dtype.itemsize == 1:
        raise ModelLoadError(f"{path.name}: weight {name!r} is {dtype}; weights must be 16/32-bit floats, or "
                             "float8_e4m3fn with their scales in an FP8 checkpoint")
    if name.endswith(".weight") and (scale := _stored_weight_scale(name.rpartition(".")[0], index)):
        raise ModelLoadError(f"{path.name}: weight {name!r} is {dtype} but the checkpoint holds its scale {scale!r}: "
                             "an FP8 checkpoint's quantized weights must be stored as float8_e4m3fn (the scale would "
                             "be lost)")


def _stored_weight_scale(module: str, index: dict, first: str | None = None) -> str | None:
    """The checkpoint name of `module`'s weight scale in `index` (`first`, a scheme's own suffix, then
    `_WEIGHT_SCALE_SUFFIXES`), or None where it has none."""
    suffixes = (first, *_WEIGHT_SCALE_SUFFIXES) if first else _WEIGHT_SCALE_SUFFIXES
    return next((f"{module}.{s}" for s in suffixes if f"{module}.{s}" in index), None)


def _weight_scale(name: str, index: dict, scheme: Fp8Scheme, path: Path) -> torch.Tensor:
    """The checkpoint scale of float8 weight `name` (the scheme's suffix first; any file of `index`), which must
    be finite and >= 0 everywhere (ModelLoadError naming it, or naming the scale that is missing)."""
    module = name[: -len(".weight")]
    found = _stored_weight_scale(module, index, scheme.scale_suffix)
    if found is None:
        raise ModelLoadError(f"{path.name}: float8 weight {name!r} has no {module}.{scheme.scale_suffix}")
    scale = index[found][1].get_tensor(found)
    values = scale.float()
    bad = ~torch.isfinite(values) | (values < 0)
    if bool(bad.any()):
        raise ModelLoadError(f"{index[found][0].name}: weight scale {found!r} holds {values[bad][0].item():g}; a "
                             "weight scale must be finite and >= 0")
    return scale


def _read_kv_scale(model: DecoderForCausalLM, match: re.Match, tensor: torch.Tensor,
                   file: str) -> tuple[int, tuple[int, ...], float]:
    """One checkpoint k_scale or v_scale (kv_scale: both) as (layer, its columns of `model.kv_scales`: 0 k, 1 v,
    value); a per-tensor scale (one value, the same on every tensor-parallel rank) that is finite and positive, else
    a ModelLoadError naming it."""
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
    return layer, (0, 1) if kind == "kv_scale" else (0,) if kind.startswith("k") else (1,), value


def _set_kv_scales(model: DecoderForCausalLM, found: dict[int, dict[int, float]], unloaded: list[str]) -> None:
    """The checkpoint's scales (`found`: layer -> {0: k_scale, 1: v_scale}) into `model.kv_scales`, settled as
    vLLM's `BaseKVCacheMethod.process_weights_after_loading` settles them: a layer given both keeps each; a layer
    given one takes it for both (vLLM's max of the two, the missing one being its -1 sentinel); a layer given
    none keeps 1.0 (`build_model`'s). `unloaded`: the checkpoint's KV-cache scales of a model that is not FP8,
    left out as vLLM leaves them (its attention loads them only through an FP8 config's KV-cache method), which
    rank 0 warns of once."""
    if unloaded and (model.tp is None or model.tp.rank == 0):
        logger.warning("%d KV-cache scales in the checkpoint (e.g. %s) are not loaded: the model is not FP8-quantized, "
                       "and as in vLLM only an FP8 quantization (the checkpoint's, or quantization='fp8') loads them; "
                       "an fp8 KV cache runs with scales 1.0", len(unloaded), unloaded[0])
    for layer, given in found.items():
        k, v = given.get(0), given.get(1)
        if k is None or v is None:
            k = v = max(x for x in (k, v) if x is not None)
        model.kv_scales[layer, 0], model.kv_scales[layer, 1] = k, v
