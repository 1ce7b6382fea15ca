"""The cache of converted GGUF models under what users' machines do to it: processes converting at once, a
converter killed, a cache that cannot be written, a file changed during its conversion, no home directory."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from batchllm.config import default_cache_dir
from batchllm.models import default_model
from batchllm.models.default_model import find_gguf, gguf_model_dir
from batchllm.models.spec import ModelLoadError


def fake_conversion(calls: list, seconds: float = 0.0):
    """Stands in for the dequantizing conversion: writes a config and counts its calls."""

    def convert(gguf_path, out_dir, name):
        calls.append(out_dir)
        time.sleep(seconds)
        (out_dir / "config.json").write_text("{}")

    return convert


def test_processes_converting_one_file_at_once_wait_for_the_first(tmp_path, monkeypatch):
    """Each converted it (1.3 GB of memory each for SmolLM2, tens of GB for a 7B file, and as much disk). They now
    take the target's lock; a later one finds the conversion done when it gets it."""
    calls: list = []
    monkeypatch.setattr(default_model, "_convert", fake_conversion(calls, seconds=0.5))
    target = tmp_path / "cache" / "Model"
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(default_model._convert_once(
        Path("x.gguf"), target, "Model", "the default model"))) for _ in range(3)]
    for thread in threads:  # (flock: each open of the lock file is its own holder, threads of one process too)
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [target] * 3 and len(calls) == 1, calls
    assert (target / "config.json").is_file() and (target / default_model._DONE_MARKER).is_file()


def test_a_conversion_killed_midway_leaves_nothing_the_next_one_keeps(tmp_path, monkeypatch):
    """A converter killed (SIGKILL, the OOM killer) left its temporary directory, a float32 copy of the model (514 MB
    for SmolLM2), which nothing removed. The next conversion of the same target removes it; another target's and
    other names stay."""
    calls: list = []
    monkeypatch.setattr(default_model, "_convert", fake_conversion(calls))
    cache = tmp_path / "cache"
    abandoned = cache / ".convert-Model-k1ll3d"
    abandoned.mkdir(parents=True)
    (abandoned / "model.safetensors").write_bytes(bytes(1000))
    others = [cache / ".convert-Other-x1y2z3", cache / ".convert-Model-extra-x1y2z3", cache / "Model-keep"]
    for other in others:
        other.mkdir()
    default_model._convert_once(Path("x.gguf"), cache / "Model", "Model", "the default model")
    assert not abandoned.exists() and all(other.exists() for other in others)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".convert-")) == sorted(
        p.name for p in others if p.name.startswith(".convert-"))


def test_without_file_locks_no_conversion_removes_another_s_temporary_directory(tmp_path, monkeypatch):
    """On a filesystem that takes no locks (Lustre without flock, NFS without lockd) each process converts, as
    before; the sweep of abandoned temporary directories, which only the lock makes safe, removed a conversion
    another process was writing."""
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(default_model, "_convert", fake_conversion([]))
    cache = tmp_path / "cache"
    in_progress = cache / ".convert-Model-0th3r1"
    in_progress.mkdir(parents=True)
    assert default_model._convert_once(Path("x.gguf"), cache / "Model", "Model", "the default model") == cache / "Model"
    assert in_progress.is_dir()


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device", "/c/.convert-M-1/w"),
                                     PermissionError(errno.EACCES, "Permission denied", "/c"),
                                     Exception("Error while serializing: IoError(No space left on device (os error "
                                               "28))")])
def test_a_cache_that_cannot_be_written_is_named_with_what_to_do(tmp_path, monkeypatch, failure):
    """A read-only cache gave "[Errno 13] Permission denied: '...'", a full disk "unexpected failure:
    SafetensorError ..." (exit 3), and a GGUF file's conversion blamed the model. Now one line names the cache and
    BATCHLLM_CACHE_DIR (a ModelLoadError: exit 2); a failure of another kind stays what it is."""
    def fail(*args):
        raise failure

    monkeypatch.setattr(default_model, "_convert", fail)
    with pytest.raises(ModelLoadError, match=r"cannot write the default model's conversion into the cache .*"
                                             r"set BATCHLLM_CACHE_DIR to a writable directory") as refused:
        default_model._convert_once(Path("x.gguf"), tmp_path / "Model", "Model", "the default model")
    assert ("No space left" in str(refused.value)) or ("Permission denied" in str(refused.value))
    assert [p.name for p in tmp_path.iterdir()] == [".Model.lock"], "no half conversion left"
    monkeypatch.setattr(default_model, "_convert", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        default_model._convert_once(Path("x.gguf"), tmp_path / "Model", "Model", "the default model")


def test_a_cache_path_that_is_a_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(default_model, "_convert", lambda *a: pytest.fail("no conversion: no cache"))
    with pytest.raises(ModelLoadError, match=r"cannot write the default model's conversion into the cache "
                                             r".*afile'.*BATCHLLM_CACHE_DIR"):
        default_model._convert_once(Path("x.gguf"), tmp_path / "afile" / "Model", "Model", "the default model")


def test_a_conversion_ending_after_its_file_changed_keeps_the_newer_one(tmp_path, monkeypatch):
    """A conversion that began before the GGUF file changed and ended after the new file's conversion removed that
    newer one (as an older conversion of the same file) and kept its own: the next run converted again."""
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "race.gguf"
    shutil.copy(find_gguf(), gguf)
    calls: list = []
    plain = fake_conversion(calls)

    def convert(gguf_path, out_dir, name):
        plain(gguf_path, out_dir, name)
        if len(calls) == 1:  # the file changes while the first conversion runs; the new one converts and ends first
            stat = gguf.stat()
            os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
            newer.append(gguf_model_dir(gguf))

    newer: list = []
    monkeypatch.setattr(default_model, "_convert", convert)
    older = gguf_model_dir(gguf)
    assert newer and newer[0] != older and (newer[0] / default_model._DONE_MARKER).is_file(), "the newer one stays"
    assert gguf_model_dir(gguf) == newer[0] and len(calls) == 2, "found, not converted again"


def test_the_cache_directory_expands_a_tilde_and_names_what_to_set_without_a_home(monkeypatch):
    """BATCHLLM_CACHE_DIR='~/x' (a quoted value, Docker -e, a systemd or .env file) made a folder named '~' in the
    current directory, converting again in each; without a home directory (HOME unset, a uid with no passwd
    entry) every `run` failed with "unexpected failure: RuntimeError: Could not determine home directory", even
    with its own --model."""
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", "~/blcache")
    assert default_cache_dir() == Path.home() / "blcache"
    monkeypatch.delenv("BATCHLLM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert default_cache_dir() == Path.home() / "xdg" / "batchllm"
    monkeypatch.delenv("XDG_CACHE_HOME")

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(ValueError, match="no home directory is known.*set BATCHLLM_CACHE_DIR"):
        default_cache_dir()
    from batchllm import cli

    args = cli.build_parser().parse_args(["run", "in.jsonl", "-o", "out.jsonl", "--model", "/some/model"])
    assert cli.results_options(args, {})["model"] == "/some/model", "a job with its own model needs no cache"
