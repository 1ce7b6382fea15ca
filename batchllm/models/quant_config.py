"""FP8 weight quantization: which scheme a model runs with, read from the option and config.json.

Torch-free. A checkpoint's `quantization_config` (else `compression_config`) is parsed into an `Fp8Scheme` (or
refused with a ModelLoadError that names what cannot be honoured, and the key it came from);
`resolve_quantization` combines it with the `quantization` option: a pre-quantized checkpoint runs FP8 whatever
the option says as long as the option does not ask for something else, and `quantization="fp8"` on a 16/32-bit
checkpoint quantizes the weights at load.

Whatever the checkpoint's layout, the engine runs one layout (`layers/fp8.py`): float8_e4m3fn
weights with one float32 scale per output channel, activations quantized per token at run time.
Per-tensor and per-channel checkpoint scales map onto it exactly (a per-tensor scale is repeated
over the tensor's rows, so fused q/k/v keep their own scales); block-wise weights are dequantized
and requantized per channel at load (see `Fp8Scheme.weight_strategy`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from batchllm.models.spec import ModelLoadError

QUANTIZATION_METHODS = ("fp8", "compressed-tensors")
"""Values of the `quantization` option (None: the checkpoint decides): fp8 quantizes a 16/32-bit checkpoint at load
or names an FP8 checkpoint's method; compressed-tensors (vLLM's spelling) names a compressed-tensors checkpoint's."""


@dataclass(frozen=True)
class Fp8Scheme:
    """How the decoder's linear layers are stored in the checkpoint and run.

    checkpoint_fp8: the checkpoint holds float8_e4m3fn weights with scales (else: quantized at load).
    weight_strategy: "tensor" (one scale per checkpoint tensor), "channel" (one per output row) or
    "block" (one per `block_size` tile; dequantized and requantized per channel at load: one
    matmul layout, torch's row-wise `_scaled_mm`, at the cost of one more rounding of the tiles whose
    scale was below their row's largest).
    scale_suffix: the checkpoint name of a weight's scale (`<module>.<scale_suffix>`).
    static_input: the checkpoint carries calibrated `input_scale`s. They must be present (a
    checkpoint without them is refused) but activations are still quantized per token at run time,
    which is never coarser than one calibrated scale per tensor.
    ignore, targets: the checkpoint's modules left in 16/32 bits (`ignore`, `ignored_layers`,
    `modules_to_not_convert`) and those its one config group quantizes (compressed-tensors' `targets`;
    "Linear": all), as vLLM matches them (a name, or "re:" and a regex from its start): `quantizes`.
    kv_cache_fp8: the checkpoint declares an FP8 KV cache (compressed-tensors' `kv_cache_scheme`): with
    kv_cache_dtype "auto" the cache is FP8, its scales the checkpoint's, as vLLM runs such a checkpoint.
    config_key: the config.json key the scheme came from ("quantization_config", or "compression_config" where
    there is none), which errors about it name; not part of the scheme's equality.
    weight_only: FP8 weights with 16-bit activations (compressed-tensors without `input_activations`, vLLM's
    W8A16Fp8): the layers run in the model dtype, each weight dequantized at load (the product W8A16 computes,
    at twice the weights' memory).
    kv_cache_per_head: the declared FP8 cache has a k and v scale per KV head (kv_cache_scheme strategy
    "attn_head"), which this engine cannot run: such a checkpoint runs with an unquantized cache only
    (kv_cache_dtype "bfloat16" / "float16"), its KV scales left unread (`resolve_kv_cache_dtype`).
    A compressed-tensors checkpoint that quantizes no linear layer (its one group targets attention, or none has
    weights: a KV-cache-only checkpoint) has `targets` () and runs its linears in 16 bits, as in vLLM.
    """

    checkpoint_fp8: bool
    weight_strategy: str = "channel"
    block_size: tuple[int, int] | None = None
    scale_suffix: str = "weight_scale"
    static_input: bool = False
    method: str = "fp8"
    kv_cache_fp8: bool = False
    ignore: tuple[str, ...] = ()
    targets: tuple[str, ...] = ("Linear",)
    config_key: str = field(default="quantization_config", compare=False)
    weight_only: bool = False
    kv_cache_per_head: bool = False

    def quantizes(self, module: str, parts: tuple[str, ...] = ()) -> bool:
        """Whether the decoder linear `module` (its checkpoint name, e.g. model.layers.0.mlp.down_proj) runs in
        FP8; a fused module (qkv_proj) by its checkpoint `parts`, which must agree, as vLLM requires
        (ModelLoadError naming them), unless its own name is listed as it is (vLLM matches no regex against it)."""
        if module in self.ignore:
            return False
        prefix = module.rpartition(".")[0]
        verdicts = {self._quantizes_one(f"{prefix}.{part}") for part in parts} if parts else {
            self._quantizes_one(module)}
        if len(verdicts) > 1:
            raise ModelLoadError(f"{self.config_key} quantizes some but not all of {module}'s parts "
                                 f"({', '.join(parts)}): a fused layer takes one precision, as in vLLM")
        return verdicts.pop()

    def _quantizes_one(self, name: str) -> bool:
        """One checkpoint module's verdict: compressed-tensors matches its lists by name or "re:" regex, fp8's
        `ignored_layers` by name only (vLLM's `is_layer_skipped`)."""
        ignored = _matches(name, self.ignore) if self.method == "compressed-tensors" else name in self.ignore
        return not ignored and ("Linear" in self.targets or _matches(name, self.targets))

    def describe(self) -> str:
        if not self.checkpoint_fp8:
            return "fp8 (weights quantized per channel at load)"
        if not self.targets:
            return f"{self.method} checkpoint, no linear layer quantized"
        block = f" {self.block_size[0]}x{self.block_size[1]}" if self.block_size else ""
        only = ", weight-only (dequantized at load: 16-bit activations and weights)" if self.weight_only else ""
        return f"{self.method} checkpoint, {self.weight_strategy}{block} weight scales{only}"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """vLLM's match of a module name against a config's list: equal to an entry, or matched from its start by an
    entry's regex ("re:" and the regex)."""
    return any(re.match(p[3:], name) if p.startswith("re:") else p == name for p in patterns)


def _names(qc: dict, keys: tuple[str, ...], source: str, key: str) -> tuple[str, ...]:
    """The first of `keys` the config holds, as a tuple of module names (ModelLoadError if not a list of
    strings, naming the file `source` and the config.json `key` the config came from)."""
    value = next((qc[k] for k in keys if qc.get(k)), None) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ModelLoadError(f"{source}: {key} {keys[0]} must be a list of module names")
    return tuple(value)


def checkpoint_quantization(cfg: dict, source: str) -> Fp8Scheme | None:
    """A config.json's FP8 scheme (`parse_quantization_config`) from its `quantization_config`, else its
    `compression_config` (the key older compressed-tensors checkpoints write, which vLLM reads when there is no
    quantization_config); None: neither. Errors name the key the config came from. `source`: the file."""
    key = "compression_config" if cfg.get("quantization_config") is None else "quantization_config"
    return parse_quantization_config(cfg.get(key), source, key)


def normalized_method(method: object) -> object:
    """A quantization method's name as vLLM compares it: lowercased, the library's "compressed_tensors" spelled
    "compressed-tensors" (vLLM's `_normalize_quantization_config`); a value that is not a string is kept (and refused
    by its reader)."""
    return method.lower().replace("compressed_tensors", "compressed-tensors") if isinstance(method, str) else method


def parse_quantization_config(qc: object, source: str, key: str = "quantization_config") -> Fp8Scheme | None:
    """The scheme of a config.json `quantization_config` (None when there is none); a config this
    engine cannot honour raises a ModelLoadError naming the method or field. `source`: the file; `key`: the
    config.json key `qc` came from, which errors and the scheme's `config_key` name.
    quant_method is matched as vLLM matches it (`normalized_method`: "FP8", "compressed_tensors" are taken)."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ModelLoadError(f"{source}: {key} is not a JSON object")
    method = normalized_method(qc.get("quant_method"))
    if method == "fp8":
        return replace(_parse_fp8(qc, source, key), config_key=key)
    if method == "compressed-tensors":
        return replace(_parse_compressed_tensors(qc, source, key), config_key=key)
    raise ModelLoadError(f"{source}: {key} quant_method {qc.get('quant_method')!r} is not supported "
                         f"(only FP8: quant_method 'fp8' or 'compressed-tensors' with 8-bit float weights)")


def _parse_fp8(qc: dict, source: str, key: str) -> Fp8Scheme:
    """An fp8 quant_method's scheme (`parse_quantization_config`'s `source` and `key`)."""
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ModelLoadError(f"{source}: fp8 fmt {fmt!r} is not supported (only e4m3)")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ModelLoadError(f"{source}: fp8 activation_scheme {scheme!r} is not supported (dynamic or static)")
    ignore = _names(qc, ("ignored_layers", "modules_to_not_convert"), source, key)
    block = qc.get("weight_block_size")
    if block is None:
        return Fp8Scheme(True, "tensor", None, "weight_scale", scheme == "static", ignore=ignore)
    if (not isinstance(block, list) or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)):
        raise ModelLoadError(f"{source}: fp8 weight_block_size {block!r} is not two positive integers")
    if scheme == "static":
        raise ModelLoadError(f"{source}: fp8 with weight_block_size needs activation_scheme 'dynamic', got 'static'")
    return Fp8Scheme(True, "block", (block[0], block[1]), "weight_scale_inv", False, ignore=ignore)


def _parse_compressed_tensors(qc: dict, source: str, key: str) -> Fp8Scheme:
    """A compressed-tensors quant_method's scheme (`parse_quantization_config`'s `source` and `key`)."""
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise ModelLoadError(f"{source}: {key} config_groups must be a JSON object (group name -> group), got "
                             f"{type(groups).__name__}")
    groups = {name: group for name, group in groups.items() if not _quantizes_no_linear(group)}
    kv_fp8, per_head = _kv_cache_scheme(qc.get("kv_cache_scheme"), source)
    if not groups:  # (a KV-cache-only checkpoint, or one whose group quantizes attention: its linears in 16 bits)
        return Fp8Scheme(True, method="compressed-tensors", kv_cache_fp8=kv_fp8, kv_cache_per_head=per_head,
                         targets=())
    if len(groups) != 1:
        raise ModelLoadError(f"{source}: compressed-tensors with {len(groups)} config_groups is not supported "
                             f"(exactly one group of FP8 Linear weights)")
    (name, group), = groups.items()
    if not isinstance(group, dict):
        raise ModelLoadError(f"{source}: compressed-tensors config group {name!r} must be a JSON object, got "
                             f"{type(group).__name__}")
    weights, acts = _section(group, "weights", source, name), group.get("input_activations")
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise ModelLoadError(f"{source}: compressed-tensors group {name!r} has weights of type "
                             f"{weights.get('type')!r} with {weights.get('num_bits')!r} bits; only 8-bit float (FP8)")
    strategy = weights.get("strategy")
    if strategy not in ("tensor", "channel", "block"):
        raise ModelLoadError(f"{source}: compressed-tensors FP8 weight strategy {strategy!r} is not supported "
                             f"(tensor, channel or block)")
    if weights.get("dynamic") or weights.get("symmetric") is False:
        raise ModelLoadError(f"{source}: compressed-tensors FP8 weights must be static and symmetric")
    block = None
    if strategy == "block":
        block = weights.get("block_structure")
        if not (isinstance(block, list) and len(block) == 2
                and all(type(b) is int and b > 0 for b in block)):  # (bool is an int: refused)
            raise ModelLoadError(f"{source}: compressed-tensors block strategy needs a block_structure of two "
                                 f"positive integers, got {block!r}")
        block = (block[0], block[1])
    static = False
    if acts is not None:
        acts = _section(group, "input_activations", source, name)
        if acts.get("type") != "float" or acts.get("num_bits") != 8:
            raise ModelLoadError(f"{source}: compressed-tensors input_activations of type {acts.get('type')!r} "
                                 f"with {acts.get('num_bits')!r} bits are not supported (8-bit float or none)")
        static = not acts.get("dynamic", False)
    return Fp8Scheme(True, strategy, block, "weight_scale", static, method="compressed-tensors",
                     kv_cache_fp8=kv_fp8, kv_cache_per_head=per_head,
                     ignore=_names(qc, ("ignore",), source, key),
                     targets=_names(group, ("targets",), source, key) or ("Linear",), weight_only=acts is None)


def _quantizes_no_linear(group: object) -> bool:
    """Whether a compressed-tensors config group leaves every linear layer as it is: one that targets an attention
    module alone ("LlamaAttention": attention quantization, which rides on the KV cache's scheme; vLLM drops it too)
    or has no weights section (its targets stay unquantized here; vLLM 0.26 fails to validate such a group)."""
    if not isinstance(group, dict):
        return False
    targets = group.get("targets")
    attention = (isinstance(targets, list) and len(targets) == 1 and isinstance(targets[0], str)
                 and targets[0].endswith("Attention"))
    return attention or group.get("weights") is None


def _section(group: dict, name: str, source: str, group_name: str) -> dict:
    """A compressed-tensors config group's `name` section ({} where absent), which must be a JSON object
    (ModelLoadError naming the group and section)."""
    section = group.get(name) or {}
    if not isinstance(section, dict):
        raise ModelLoadError(f"{source}: compressed-tensors group {group_name!r} {name} must be a JSON object, got "
                             f"{type(section).__name__}")
    return section


def _kv_cache_scheme(scheme: object, source: str) -> tuple[bool, bool]:
    """Whether a compressed-tensors `kv_cache_scheme` declares an FP8 KV cache (None: it declares none), and whether
    its scales are per KV head ("attn_head": runnable only unquantized, `Fp8Scheme.kv_cache_per_head`); one this
    engine cannot read raises a ModelLoadError naming it (vLLM's checks)."""
    if scheme is None:
        return False, False
    if not isinstance(scheme, dict):
        raise ModelLoadError(f"{source}: compressed-tensors kv_cache_scheme is not a JSON object")
    if scheme.get("type") != "float" or scheme.get("num_bits") != 8:
        raise ModelLoadError(f"{source}: compressed-tensors kv_cache_scheme of type {scheme.get('type')!r} with "
                             f"{scheme.get('num_bits')!r} bits is not supported (8-bit float)")
    if scheme.get("strategy") not in ("tensor", "attn_head"):
        raise ModelLoadError(f"{source}: compressed-tensors kv_cache_scheme strategy {scheme.get('strategy')!r} is "
                             f"not supported (tensor: one k and one v scale per layer)")
    if not scheme.get("symmetric"):
        raise ModelLoadError(f"{source}: compressed-tensors kv_cache_scheme must be symmetric")
    return True, scheme.get("strategy") == "attn_head"


def resolve_quantization(option: str | None, checkpoint: Fp8Scheme | None) -> Fp8Scheme | None:
    """The scheme the engine runs: the checkpoint's when it is pre-quantized (the option, one of ModelConfig's
    choices, may be None or name the checkpoint's method, as vLLM requires), an at-load FP8 scheme for
    quantization='fp8' on a 16/32-bit checkpoint, else None."""
    if checkpoint is not None and option not in (None, checkpoint.method):
        raise ValueError(f"quantization={option!r} conflicts with the checkpoint's {checkpoint.config_key} (method "
                         f"{checkpoint.method!r}): leave it None (the checkpoint decides) or give that method")
    if checkpoint is not None:
        return checkpoint
    if option == "compressed-tensors":
        raise ValueError("quantization='compressed-tensors' names a compressed-tensors checkpoint's method, and this "
                         "checkpoint has no quantization_config: give 'fp8' to quantize it at load")
    return Fp8Scheme(checkpoint_fp8=False) if option == "fp8" else None


def resolve_kv_cache_dtype(option: str, checkpoint: Fp8Scheme | None, model_dtype: str) -> str:
    """The KV cache's kv_cache_dtype: the option's, except "auto" on a checkpoint declaring an FP8 cache
    (`Fp8Scheme.kv_cache_fp8`), which is "fp8" as in vLLM; "bfloat16" or "float16" (vLLM's way to keep such a
    checkpoint's cache unquantized) is the model's dtype, which must then be that one (ValueError). `model_dtype`: the
    resolved dtype's name."""
    if option in ("bfloat16", "float16"):
        if model_dtype != option:
            raise ValueError(f"kv_cache_dtype={option!r} keeps the cache in the model's dtype, which is {model_dtype}"
                             f": give dtype={option!r} too (the cache here is the model's dtype or fp8)")
        return "auto"
    if checkpoint is not None and checkpoint.kv_cache_per_head:  # ("auto", "fp8", "fp8_e4m3")
        raise ValueError(f"the checkpoint's kv_cache_scheme strategy 'attn_head' (a k and v scale per KV head) is not "
                         f"supported with kv_cache_dtype={option!r}: give kv_cache_dtype='bfloat16' (or 'float16', "
                         "with that dtype) to run it with an unquantized cache")
    if option == "auto" and checkpoint is not None and checkpoint.kv_cache_fp8:
        return "fp8"
    return option

