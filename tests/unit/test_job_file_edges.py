"""The job's files where the filesystem or the file given is unusual (session 55's probe of input and output
bytes): a filesystem without locks, a state file that cannot be rewritten, names a job cannot use, JSON documents
and compressed files given as JSONL, a pipe and a file:// URL as the input. Each was a bare or misleading error."""

from __future__ import annotations

import bz2
import errno
import functools
import json
import lzma
import os
from pathlib import Path

import pytest

from batchllm import cli
from batchllm.io import job
from batchllm.io.job import (
    ERRORS_FIRST_LINE,
    JobError,
    OutputLock,
    OutputWriteError,
    ResultWriter,
    claim_errors_file,
    prepare_output,
    state_path_for,
)

FAILED = {"id": "batch_req_1", "custom_id": "c1", "response": None,
          "error": {"code": "invalid_request", "message": "line 2: bad url"}}


def run(capsys, *args):
    code = cli.main(["run", *map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


def job_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    src, out, errors = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"c{i}", "body": {}}) + "\n" for i in range(2)))
    return src, out, errors


def errors_writer(out: Path, errors: Path) -> ResultWriter:
    return ResultWriter(errors, lazy=True, on_open=functools.partial(claim_errors_file, out))


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
    """Lustre without flock, NFS without its lock daemon: every job failed with "batchllm: error: None", and an
    errors file's lock with an "unexpected failure" mid-job. Now the job runs, saying it holds no lock; another
    lock error is still named."""
    src, out, errors = job_files(tmp_path)

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(job.fcntl, "flock", no_locks)
    with OutputLock(out) as lock:
        assert lock.write_problem is None
        prepare_output(out, src, False, errors)
        writer = errors_writer(out, errors)
        writer.write(FAILED)
        writer.close()
    err = capsys.readouterr().err
    assert f"cannot lock '{out}' (No locks available" in err and f"cannot lock '{errors}'" in err, err
    assert json.loads(errors.read_text())["custom_id"] == "c1"
    assert ERRORS_FIRST_LINE in json.loads(state_path_for(out).read_text())

    def failing_lock(fd, operation):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(job.fcntl, "flock", failing_lock)
    with pytest.raises(JobError, match=r"cannot lock the output '.*other.jsonl': Input/output error"):
        with OutputLock(tmp_path / "other.jsonl"):
            pass


def fail_syncing_state_files(monkeypatch) -> None:
    """Every fsync of a state file's temporary copy fails as a full disk fails (ENOSPC)."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(job.STATE_SUFFIX + job.STATE_TMP_SUFFIX):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(job.os, "fsync", fsync)


def test_a_state_file_that_cannot_be_written_is_named_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A full disk while the state file was rewritten (at the errors file's first record) was an "unexpected
    failure" (exit 3) and left OUT.batchllm-state.tmp; at the job's start it named the output, not the state file."""
    src, out, errors = job_files(tmp_path)
    prepare_output(out, src, False, errors)
    before = state_path_for(out).read_text()
    fail_syncing_state_files(monkeypatch)
    writer = errors_writer(out, errors)
    with pytest.raises(OutputWriteError, match=r"cannot write the output's state file .*out\.jsonl\.batchllm-state: "
                                               r"No space"):
        writer.write(FAILED)
    writer.close()
    assert state_path_for(out).read_text() == before and not list(tmp_path.glob("*.tmp"))
    fresh = tmp_path / "fresh.jsonl"
    with pytest.raises(JobError, match=r"cannot write the output's state file .*fresh\.jsonl\.batchllm-state: No"):
        prepare_output(fresh, src, False)
    assert not list(tmp_path.glob("*.tmp"))
    monkeypatch.undo()
    writer = errors_writer(out, errors)  # room again: the job goes on from the state file it had
    writer.write(FAILED)
    writer.close()
    assert prepare_output(out, src, False, errors).done_error_lines == {2}


def test_names_a_job_cannot_use_are_refused_before_anything_is_made(tmp_path, capsys):
    """`-o OTHER.batchllm-state --overwrite` destroyed another job's state file (it could no longer resume); an
    output name near 255 bytes gave two errors, exit 3, an empty output and empty folders left behind."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    other = tmp_path / "c.jsonl.batchllm-state"
    other.write_text("{}\n")
    code, err = run(capsys, src, "-o", other, "--overwrite")
    assert code == 2 and "-o '" in err and "names a job's state file" in err, err
    code, err = run(capsys, src, "-o", tmp_path / "d.jsonl", "--errors-file", other, "--overwrite")
    assert code == 2 and "--errors-file '" in err and "names a job's state file" in err, err
    assert other.read_text() == "{}\n"
    long_name = tmp_path / "new" / "sub" / ("x" * 240 + ".jsonl")
    code, err = run(capsys, src, "-o", long_name)
    assert code == 2 and "is too long" in err and ".batchllm-state.tmp' (" in err and "choose a shorter -o" in err
    assert err.count("error:") == 1 and not (tmp_path / "new").exists()
    code, err = run(capsys, src, "-o", tmp_path / "short.jsonl", "--errors-file", tmp_path / ("e" * 260))
    assert code == 2 and "the errors file's name 'eee" in err and "or --errors-file" in err, err


def test_a_refused_job_removes_the_folders_it_made(tmp_path):
    """A job refused after its lock made the output's folders left them behind, empty."""
    src, _, _ = job_files(tmp_path)
    out = tmp_path / "made" / "deeper" / "out.jsonl"
    with pytest.raises(JobError):
        with OutputLock(out):
            raise JobError("refused")
    assert not (tmp_path / "made").exists()
    with OutputLock(out):  # a job that wrote keeps its folder
        prepare_output(out, src, False)
    assert out.parent.is_dir() and state_path_for(out).exists()


def test_json_documents_and_compressed_files_are_refused_at_the_start(tmp_path, capsys):
    """A JSON array (on one line or written across lines) gave one record or a malformed-JSON record per line, and
    marked the output complete; bzip2, xz and zstd files gave a "not valid UTF-8" record per chunk of bytes."""
    requests = [{"id": f"q{i}", "prompt": "Hi"} for i in range(3)]
    text = "\n".join(json.dumps(r) for r in requests) + "\n"
    cases = {"array.json": (json.dumps(requests).encode(), "it is a JSON array"),
             "pretty.json": (json.dumps(requests, indent=2).encode(), "it is a JSON array"),
             "object.json": (json.dumps(requests[0], indent=2).encode(), "JSON written across lines"),
             "in.jsonl.bz2": (bz2.compress(text.encode()), "bzip2-compressed"),
             "in.jsonl.xz": (lzma.compress(text.encode()), "xz-compressed"),
             "in.jsonl.zst": (b"\x28\xb5\x2f\xfd" + b"\x00" * 16, "zstd-compressed")}
    for name, (data, said) in cases.items():
        (tmp_path / name).write_bytes(b"\n" + data if name == "pretty.json" else data)
        code, err = run(capsys, tmp_path / name, "-o", tmp_path / "out.jsonl")
        assert code == 2 and said in err, (name, err)
    assert not (tmp_path / "out.jsonl").exists()
    (tmp_path / "fine.jsonl").write_text('{"id": "a", "prompt": "[not an array]"}\n')
    from batchllm.io.ingest import input_problem

    assert input_problem(tmp_path / "fine.jsonl") is None


def test_a_pipe_and_a_file_url_are_named_as_what_they_are(tmp_path, capsys):
    """`batchllm run <(cat x.jsonl)` said "cannot read the input from standard input (/dev/fd/63)"; file:///x was
    shown as 'file://x' and refused as a URL to download."""
    read_end, write_end = os.pipe()
    try:
        code, err = run(capsys, f"/dev/fd/{read_end}", "-o", tmp_path / "o.jsonl")
        assert code == 2 and f"cannot read the input from a pipe (/dev/fd/{read_end})" in err, err
    finally:
        os.close(read_end)
        os.close(write_end)
    from batchllm.io.job import stream_words

    assert [stream_words(Path(p)) for p in ("-", "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0", "/dev/fd/63")] == [
        "standard input"] * 4 + ["a pipe"]
    src = tmp_path / "in.jsonl"
    code, err = run(capsys, f"file://{src}", "-o", tmp_path / "o.jsonl")
    assert code == 2 and f"'file://{src}': it is a file:// URL; give the file's path ({src})" in err, err


class _FullDisk:
    """An open file whose flush fails as a full disk's does: what its buffer holds never reaches the file."""

    def __init__(self, file):
        self._file = file

    def __getattr__(self, name):
        return getattr(self._file, name)

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_writer_that_failed_counts_what_reached_the_file(tmp_path):
    """On a full disk --stats reported 17 lines recorded where the file held 9: the writer counted each record as it
    went into the buffer, and the records still buffered never reached the file. After a failure it counts the whole
    lines its file holds (those it wrote, after what the file held before), as a resume counts them."""
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "earlier"}\n')
    writer = ResultWriter(out, sync_every=1000)
    for i in range(3):
        writer.write({"id": i, "error": None if i else {"message": "bad"}})
    writer.sync()
    for i in range(3, 6):
        writer.write({"id": i, "error": {"message": "bad"}})
    assert (writer.num_written, writer.num_errors) == (6, 4)
    writer._file = _FullDisk(writer._file)
    with pytest.raises(OutputWriteError, match="No space left on device"):
        writer.sync()
    assert (writer.num_written, writer.num_errors) == (3, 1)
    writer._file = writer._file._file
    writer.close()  # (the disk has room again: closing flushes the rest, counted)
    assert (writer.num_written, writer.num_errors) == (6, 4)
    assert len(out.read_bytes().splitlines()) == 7


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_writer_to_a_device_that_is_full_fails_at_once():
    """The count of what reached the file read /dev/full back: zeros without end, until memory ran out. A file that
    is no regular one is not read back (the CLI refuses such outputs first; the writer is a library class too)."""
    writer = ResultWriter(Path("/dev/full"), sync_every=1000)
    for i in range(3):
        writer.write({"id": i, "error": None})
    with pytest.raises(OutputWriteError, match="No space left on device"):
        writer.sync()
    assert writer.num_written == 3  # (unknown: as handed over)
    writer.close()
