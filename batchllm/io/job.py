"""A batch job's output file: durable appends and resume after a crash.

Beside OUTPUT lives OUTPUT.batchllm-state, written (atomically) before the first record: the input
file's size and SHA-256. Running the same command again finds the output, checks that it belongs
to the same input, cuts a torn last line (a write interrupted by SIGKILL or power loss), and
collects what is already finished: the ids of answered lines and the line numbers of error
records. Those lines are neither recomputed nor rewritten. Records are appended as requests
complete and made durable (flush + fsync) every `sync_every` records or `sync_seconds`.

Writer of OUTPUT and its state file only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_SUFFIX = ".batchllm-state"
_LINE_IN_MESSAGE = re.compile(r"^line (\d+):")


class JobError(RuntimeError):
    """The job cannot start (the message says why); nothing was written."""


@dataclass
class ResumeState:
    done_ids: set[str] = field(default_factory=set)
    """Ids (or custom_ids) of lines already answered."""
    done_error_lines: set[int] = field(default_factory=set)
    """Line numbers of lines that already have an error record."""
    num_records: int = 0
    repaired_bytes: int = 0
    """Bytes of a torn last line that were cut off."""


def input_fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return {"input_size": size, "input_sha256": digest.hexdigest()}


def prepare_output(output: Path, input_path: Path, overwrite: bool) -> ResumeState:
    """Validate or create the output for this input; return what is already done."""
    state_path = output.with_name(output.name + STATE_SUFFIX)
    fingerprint = {"input": str(input_path.resolve()), **input_fingerprint(input_path)}
    has_output = output.exists() and output.stat().st_size > 0
    if has_output and not overwrite:
        try:
            state = json.loads(state_path.read_text())
        except FileNotFoundError:
            raise JobError(
                f"refusing to resume into {str(output)!r}: it exists but has no {state_path.name}, so it may "
                "belong to another job; remove it, choose another -o, or pass --overwrite"
            ) from None
        except (OSError, json.JSONDecodeError) as e:
            raise JobError(f"cannot read {state_path}: {e}") from e
        if (state.get("input_size"), state.get("input_sha256")) != (
            fingerprint["input_size"], fingerprint["input_sha256"]
        ):
            raise JobError(
                f"refusing to resume into {str(output)!r}: it was written for a different input "
                f"({state.get('input')!r}, {state.get('input_size')} bytes), not {str(input_path)!r}; "
                "choose another -o or pass --overwrite"
            )
        return _scan_and_repair(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_name(state_path.name + ".tmp")
    tmp.write_text(json.dumps(fingerprint) + "\n")
    os.replace(tmp, state_path)
    with open(output, "wb") as f:
        f.flush()
        os.fsync(f.fileno())
    return ResumeState()


def _scan_and_repair(output: Path) -> ResumeState:
    state = ResumeState()
    with open(output, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            state.repaired_bytes = len(data) - end
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    for raw in data[:end].splitlines():
        if not raw.strip():
            continue
        record = json.loads(raw)
        state.num_records += 1
        _note_done(record, state)
    return state


def _note_done(record: dict, state: ResumeState) -> None:
    error = record.get("error")
    if error:
        line = error.get("line")
        if line is None:
            match = _LINE_IN_MESSAGE.match(str(error.get("message", "")))
            line = int(match.group(1)) if match else None
        if line is not None:
            state.done_error_lines.add(int(line))
        return
    rid = record.get("custom_id", record.get("id"))
    if rid is not None:
        state.done_ids.add(str(rid))


class ResultWriter:
    """Appends one JSON line per record; durable every `sync_every` records or `sync_seconds`."""

    def __init__(self, output: Path, sync_every: int = 256, sync_seconds: float = 1.0) -> None:
        self._file = open(output, "ab")
        self.sync_every = sync_every
        self.sync_seconds = sync_seconds
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self.num_written = 0

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self.num_written += 1
        self._unsynced += 1
        if self._unsynced >= self.sync_every or time.monotonic() - self._last_sync >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        self.sync()
        self._file.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
