"""The job's files without a model: refusals before anything is written, damaged files named, the
writer's time bound, and exit statuses (issue 21)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from batchllm import cli
from batchllm.io import job
from batchllm.io.job import (
    JobError,
    ResultWriter,
    claim_errors_file,
    encode_record,
    input_fingerprint,
    prepare_output,
    state_path_for,
)


def run(capsys, *args):
    code = cli.main(["run", *map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


def write_as_the_job(out: Path, errors: Path, text: str) -> None:
    """Write `text` into `out`'s errors file as the job's writer does (it claims the file first)."""
    writer = ResultWriter(errors, lazy=True, on_open=functools.partial(claim_errors_file, out))
    try:
        lines = text.splitlines(keepends=True)
        writer.write(json.loads(lines[0]))
        writer.close()
        with open(errors, "a") as f:
            f.write("".join(lines[1:]))
    finally:
        writer.close()


def test_output_onto_the_input_is_refused_even_with_overwrite(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    content = '{"id": "a", "prompt": "hi"}\n'
    src.write_text(content)
    link = tmp_path / "other-name.jsonl"
    os.link(src, link)
    symlink = tmp_path / "sym.jsonl"
    symlink.symlink_to(src)
    for output in (src, link, symlink, tmp_path / "." / "in.jsonl"):
        for extra in ([], ["--overwrite"]):
            code, err = run(capsys, src, "-o", output, *extra)
            assert code == 2 and "onto the input file" in err, err
            assert src.read_text() == content
    assert not (tmp_path / "in.jsonl.batchllm-state").exists()


def test_output_to_standard_output_is_refused(tmp_path, capsys, monkeypatch):
    """`-o -` wrote a file named "-" into the working directory."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, src, "-o", "-")
    assert code == 2 and "results cannot go to standard output (-o -)" in err, err
    assert not (tmp_path / "-").exists()
    # /dev/stdout redirected to a file is a regular file: it was "refusing to resume ... remove it", and with
    # --overwrite the job wrote /dev/stdout.batchllm-state
    (tmp_path / "out-link").symlink_to("/dev/stdout")
    for output in ("/dev/stdout", "/proc/self/fd/1", "/tmp/../dev/fd/1", str(tmp_path / "out-link")):
        code, err = run(capsys, src, "-o", output, "--overwrite")
        assert code == 2 and f"results cannot go to '{output}'" in err, err
    from batchllm.io.job import refuse_output_onto_input

    refuse_output_onto_input(Path("/dev/shm/results.jsonl"), src)  # a tmpfs place is a file like any other
    pytest.importorskip("ray")
    code, err = run(capsys, src, "-o", "-", "--ray")  # (a directory named "-" was made)
    assert code == 2 and "results cannot go to standard output (-o -)" in err, err
    assert not (tmp_path / "-").exists()


def test_ray_overwrite_does_not_delete_a_directory_no_job_wrote(tmp_path, capsys):
    """`run --ray --overwrite -o DIR` deleted DIR whatever it held, before checking that a job wrote it;
    `--errors-file` was silently ignored with --ray."""
    pytest.importorskip("ray")
    src, data = tmp_path / "in.jsonl", tmp_path / "data"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    data.mkdir()
    (data / "precious.txt").write_text("keep me")
    code, err = run(capsys, src, "-o", data, "--ray", "--overwrite")
    assert code == 2 and "no batchllm --ray job wrote it" in err, err
    assert (data / "precious.txt").read_text() == "keep me"
    code, err = run(capsys, src, "-o", tmp_path / "shards", "--ray", "--errors-file", tmp_path / "e.jsonl")
    assert code == 2 and "--errors-file does not apply with --ray" in err, err


def test_output_onto_a_read_only_input_is_refused_before_the_output_is_opened(tmp_path, capsys, monkeypatch):
    """The lock opens the output for append; onto a read-only input (chmod 444, a read-only mount)
    that open failed first, and the user read 'cannot write the output ...: Permission denied' (or a
    traceback) instead of being told that -o names the input. The open is made to fail as it does there
    (the tests may run as root, whom chmod 444 does not stop)."""
    from batchllm.io import job

    src = tmp_path / "in.jsonl"
    content = '{"id": "a", "prompt": "hi"}\n'
    src.write_text(content)

    def read_only_open(path, mode="r", *args, **kwargs):
        if same_path(path, src) and any(c in mode for c in "wa+"):
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, mode, *args, **kwargs)

    same_path = job.same_file
    monkeypatch.setattr(job, "open", read_only_open, raising=False)  # the module's global wins over the builtin
    for extra in ([], ["--overwrite"]):
        code, err = run(capsys, src, "-o", src, *extra)
        assert code == 2 and err == (f"batchllm: error: refusing to write the output onto the input file {str(src)!r} "
                                     "(even with --overwrite: it would destroy the input); choose another -o\n"), err
    assert src.read_text() == content


@pytest.mark.parametrize("output,state,fragment", [
    ('{"id": "a", "text": "x"}\n[1, 2]\n', None, "damaged at line 2 (a JSON list, not an object)"),
    ('{"id": "a", "error": "str"}\n', None, "damaged at line 1 ('error' is neither null nor an object)"),
    ('{"id": "a", "text": "x"}\n\0\0\0\0\n', None, "damaged at line 2 (not JSON"),
    ('{"text": "x"}\n', None, "damaged at line 1 (a result without a string id)"),
    ('{"id": "a", "text": "x"}\n', "[]", "the state file"),
    ('{"id": "a", "text": "x"}\n', "\0\0\0", "the state file"),
    ('{"id": "a", "text": "x"}\n', '{"input_size": 1}', "the state file"),
])
def test_a_damaged_output_or_state_file_is_named_with_exit_2(tmp_path, capsys, output, state, fragment):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    out = tmp_path / "out.jsonl"
    out.write_text(output)
    state_path = tmp_path / "out.jsonl.batchllm-state"
    state_path.write_text(state if state is not None else json.dumps({"input": str(src), **input_fingerprint(src)}))
    code, err = run(capsys, src, "-o", out)
    assert code == 2 and err.count("\n") == 1, err
    assert fragment in err and "--overwrite" in err and (str(out) in err or str(state_path) in err), err
    assert out.read_text() == output, "a damaged output is left as it was"


def test_inputs_that_are_not_files(tmp_path, capsys):
    code, err = run(capsys, tmp_path, "-o", tmp_path / "o.jsonl")
    assert code == 2 and "is a directory" in err
    code, err = run(capsys, tmp_path / "missing.jsonl", "-o", tmp_path / "o.jsonl")
    assert code == 2 and "no such file" in err


def test_standard_input_is_refused_naming_what_to_do(tmp_path, capsys):
    """`cat x.jsonl | batchllm run - -o out.jsonl` said "cannot read input file '-': no such file"."""
    code, err = run(capsys, "-", "-o", tmp_path / "o.jsonl")
    assert code == 2 and "cannot read the input from standard input (-)" in err
    assert "a resume reads it again" in err and "cat x.jsonl > in.jsonl" in err
    if not Path("/dev/stdin").is_file():  # (a pipe, a terminal, /dev/null: no file to read again)
        code, err = run(capsys, "/dev/stdin", "-o", tmp_path / "o.jsonl")
        assert code == 2 and "from standard input (/dev/stdin)" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_plan_refuses_standard_input_in_its_own_words(capsys):
    """`batchllm plan -` gave run's refusal, which speaks of a job's fingerprint and resume: plan has neither."""
    for given in ["-"] + ([] if Path("/dev/stdin").is_file() else ["/dev/stdin"]):
        code = cli.main(["plan", given])
        err = capsys.readouterr().err
        assert code == 2 and f"batchllm: error: cannot read the input from standard input ({given}): plan " in err, err
        assert "cat x.jsonl > in.jsonl" in err and "resume" not in err and "fingerprint" not in err, err


def test_an_output_that_cannot_be_written_is_named_with_exit_2(tmp_path, capsys):
    """An output that is a directory, or under a file, used to be an 'unexpected failure' (exit 3)."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    code, err = run(capsys, src, "-o", tmp_path)
    assert code == 2 and err == f"batchllm: error: cannot write the output {str(tmp_path)!r}: it is a directory; " \
        "-o names a file\n"
    code, err = run(capsys, src, "-o", src / "out.jsonl")
    assert code == 2 and err.startswith(f"batchllm: error: cannot write the output {str(src / 'out.jsonl')!r}: ")
    assert src.read_text() == '{"id": "a", "prompt": "hi"}\n'


def test_an_output_named_as_a_directory_is_refused_and_nothing_made(tmp_path, capsys):
    """`-o newdir/` (no such directory) silently wrote a file newdir and newdir.batchllm-state: argparse's Path drops
    the trailing slash. Refused as an existing directory is, naming a file path to give."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    for given in (f"{tmp_path}/newdir/", f"{tmp_path}/newdir/.", f"{tmp_path}/sub/newdir/"):
        code, err = run(capsys, src, "-o", given)
        assert code == 2 and err == (f"batchllm: error: cannot write the output {given!r}: it names a directory; "
                                     f"-o names a file (e.g. {str(Path(given) / 'out.jsonl')!r}; a directory of "
                                     "shards is -o with --ray)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_an_unwritable_stats_file_is_refused_before_the_job_runs(tmp_path, capsys, monkeypatch):
    """--stats under a file used to fail after the whole job had run, as an 'unexpected failure' (exit 3)."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    monkeypatch.setattr(cli, "_run_locked", lambda *args: pytest.fail("the job must not start"))
    code, err = run(capsys, src, "-o", tmp_path / "o.jsonl", "--stats", src / "stats.json")
    assert code == 2 and err.startswith(f"batchllm: error: cannot write --stats {str(src / 'stats.json')!r}: ")
    code, err = run(capsys, src, "-o", tmp_path / "o.jsonl", "--stats", tmp_path)
    assert code == 2 and "it is a directory" in err
    code, err = run(capsys, src, "-o", tmp_path / "o.jsonl", "--stats", "/proc/stats.json")  # (root may, /proc not)
    assert code == 2 and "cannot write --stats '/proc/stats.json'" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_stats_onto_one_of_the_jobs_own_files_is_refused(tmp_path, capsys, monkeypatch):
    """--stats naming the input, the output or its errors file replaced that file with the statistics (exit 0)."""
    src = tmp_path / "in.jsonl"
    content = '{"id": "a", "prompt": "hi"}\n'
    src.write_text(content)
    out = tmp_path / "o.jsonl"
    monkeypatch.setattr(cli, "_run_locked", lambda *args: pytest.fail("the job must not start"))
    for stats, what in ((src, "the input file"), (out, "the output"), (tmp_path / "o.errors.jsonl", "the errors file"),
                        (tmp_path / "o.jsonl.batchllm-state", "the output's state file")):
        code, err = run(capsys, src, "-o", out, "--stats", stats)
        assert code == 2 and f"--stats {str(stats)!r} is {what}" in err
    code, err = run(capsys, src, "-o", out, "--errors-file", tmp_path / "e.jsonl", "--stats", tmp_path / "e.jsonl")
    assert code == 2 and "is the errors file" in err
    assert src.read_text() == content and not out.exists()


def test_the_errors_files_folder_is_made_before_the_job_and_a_bad_place_refused(tmp_path):
    """A missing folder failed the job at its first failed line, after the model had loaded."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    errors = tmp_path / "new" / "deeper" / "e.jsonl"
    prepare_output(tmp_path / "o.jsonl", src, False, errors)
    assert errors.parent.is_dir() and not errors.exists()
    with pytest.raises(JobError, match="is a directory"):
        prepare_output(tmp_path / "o2.jsonl", src, False, tmp_path / "new")
    with pytest.raises(JobError, match=f"cannot write the errors file .*: {str(src)!r} is a file, not a folder"):
        prepare_output(tmp_path / "o3.jsonl", src, False, src / "deeper" / "e.jsonl")  # (was "File exists")
    with pytest.raises(JobError, match="cannot write the errors file '/proc/e.jsonl'"):  # (root may, /proc not)
        prepare_output(tmp_path / "o4.jsonl", src, False, Path("/proc/e.jsonl"))


def test_an_output_under_a_file_names_that_file(tmp_path):
    """-o in.jsonl/out.jsonl said only "File exists" (mkdir's words, naming neither path)."""
    from batchllm.io.job import OutputLock

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    for output in (src / "out.jsonl", src / "deeper" / "out.jsonl"):
        with pytest.raises(JobError, match=f"cannot write the output .*: {str(src)!r} is a file, not a folder"):
            with OutputLock(output):
                pass


def test_a_compressed_or_utf16_input_is_refused_at_start_naming_what_it_is(tmp_path, capsys, monkeypatch):
    """Each was read after the model loaded, as lines of garbage: one "not valid UTF-8" record per line (exit 1)."""
    import gzip

    line = '{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}\n'
    monkeypatch.setattr(cli, "_run_locked", lambda *args: pytest.fail("the job must not start"))
    for name, data, what in (("in.jsonl.gz", gzip.compress(line.encode()), "gzip-compressed"),
                             ("u16.jsonl", line.encode("utf-16"), "UTF-16 text"),
                             ("u16be.jsonl", b"\xfe\xff" + line.encode("utf-16-be"), "UTF-16 text (big-endian)")):
        src = tmp_path / name
        src.write_bytes(data)
        code, err = run(capsys, src, "-o", tmp_path / "o.jsonl")
        assert code == 2 and f"cannot read input file {str(src)!r}: it is {what}" in err
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + line.encode())
    from batchllm.io.ingest import input_problem

    assert input_problem(bom) is None, "UTF-8 with a BOM is read"


def test_binary_files_are_refused_at_start_naming_what_they_are(tmp_path, capsys, monkeypatch):
    """A Parquet file ran as 36 lines of "not valid UTF-8" (exit 1, the job then complete), a model's 538 MB
    safetensors file as 801,097 error records over 92 s, a 1 GB file of NUL bytes as one line held whole (4.1 GB);
    each is now refused before anything runs. A line or two with a stray NUL byte stay their own lines' errors."""
    import struct

    line = b'{"id": "a", "prompt": "hi"}\n'
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    monkeypatch.setattr(cli, "_run_locked", lambda *args: pytest.fail("the job must not start"))
    for name, data, what in (("t.parquet", b"PAR1" + bytes(200) + b"PAR1", "a Parquet file"),
                             ("model.safetensors", struct.pack("<Q", len(header)) + header + bytes(4),
                              "a safetensors file"),
                             ("zeros.jsonl", bytes(1 << 17), "binary data (NUL bytes)"),
                             ("x.npy", b"\x93NUMPY\x01\x00" + bytes(100), "a NumPy array file")):
        src = tmp_path / name
        src.write_bytes(data)
        code, err = run(capsys, src, "-o", tmp_path / "o.jsonl")
        assert code == 2 and f"cannot read input file {str(src)!r}: it is {what}" in err, err
    from batchllm.io.ingest import input_problem

    stray = tmp_path / "stray.jsonl"
    stray.write_bytes(line * 50 + b'{"id": "b", "prompt": "h\x00i"}\n' + line.replace(b'"a"', b'"c"'))
    assert input_problem(stray) is None, "a stray NUL byte is its line's own error"
    stray.write_bytes(line + b'{"id": "b", "prompt": "h\x00i"}\n' + line.replace(b'"a"', b'"c"'))
    assert input_problem(stray) is None, "in a small file too (one NUL in 85 bytes)"
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_bytes((line.decode() * 3).encode("utf-16-le"))  # (no byte-order mark)
    assert "UTF-16 text without a byte-order mark: save it as UTF-8" in input_problem(utf16)


def test_urls_and_lone_carriage_returns_are_refused_at_start(tmp_path, capsys, monkeypatch):
    """vLLM's run-batch reads and writes http(s) URLs: `-o https://...` wrote a local folder "https:" and exited
    0 (nothing uploaded), and `-i https://...` said "no such file". A file whose lines end in a lone \r was one
    line: its first line failed and the others got no record at all."""
    monkeypatch.setattr(cli, "_run_locked", lambda *args: pytest.fail("the job must not start"))
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, src, "-o", "https://bucket.s3.amazonaws.com/out.jsonl?X-Amz-Signature=abc")
    assert code == 2 and "-o 'https://bucket.s3.amazonaws.com/out.jsonl?X-Amz-Signature=abc' is a URL" in err, err
    assert not (tmp_path / "https:").exists()
    code, err = run(capsys, src, "-o", "s3://bucket/out.jsonl")  # (an object store's: a folder "s3:" was made)
    assert code == 2 and "-o 's3://bucket/out.jsonl' is a URL" in err and not (tmp_path / "s3:").exists(), err
    code, err = run(capsys, "http://example.com/x.jsonl", "-o", "o.jsonl")
    assert code == 2 and "'http://example.com/x.jsonl': it is a URL" in err and "curl" in err, err
    mac = tmp_path / "mac.jsonl"
    mac.write_bytes(b'{"id": "a", "prompt": "hi"}\r{"id": "b", "prompt": "yo"}\r')
    code, err = run(capsys, mac, "-o", "o.jsonl")
    assert code == 2 and "lone carriage return" in err, err
    windows = tmp_path / "crlf.jsonl"
    windows.write_bytes(b'{"id": "a", "prompt": "hi"}\r\n{"id": "b", "prompt": "yo"}\r\n')
    from batchllm.io.ingest import input_problem

    assert input_problem(windows) is None
    # such lines after the first 64 KiB (a long first prompt) or after plain lines (two files joined) were read as
    # one malformed line, the requests after each \r unanswered and unnamed
    joined = tmp_path / "joined.jsonl"
    joined.write_bytes(b'{"id": "a", "prompt": "' + b"x" * 70_000 + b'"}\n{"id": "b", "prompt": "hi"}\n'
                       b'{"id": "c", "prompt": "hi"}\r{"id": "d", "prompt": "yo"}\r')
    code, err = run(capsys, joined, "-o", "o.jsonl")
    assert code == 2 and "joined.jsonl': line 3 ends in a lone carriage return" in err, err


def test_an_unexpected_failure_exits_3_with_one_line_and_the_traceback_only_under_debug(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(cli, "prepare_output", broken)
    code, err = run(capsys, src, "-o", tmp_path / "o.jsonl")
    assert code == 3 and err.startswith("batchllm: error: unexpected failure: KeyError") and err.count("\n") == 1
    code, err = run(capsys, src, "-o", tmp_path / "o.jsonl", "--debug")
    assert code == 3 and "Traceback" in err and "KeyError" in err


def test_an_out_of_range_seed_option_is_a_bad_option(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    code, err = run(capsys, src, "-o", tmp_path / "o.jsonl", "--seed", str(2**64))
    assert code == 2 and "seed" in err


def test_a_finished_record_is_on_disk_within_the_bound_while_the_job_is_busy(tmp_path):
    """One long request still running must not hold finished results in a buffer: nothing else is
    written after the record, and the main thread stays busy in Python (holding the GIL in turns)."""
    out = tmp_path / "out.jsonl"
    out.touch()
    with ResultWriter(out, sync_every=10_000, sync_seconds=0.2) as writer:
        writer.write({"id": "done", "text": "x"})
        started = time.monotonic()
        seen = None
        while time.monotonic() - started < 5:
            sum(range(20_000))  # busy, as a running step is
            if out.read_bytes():
                seen = time.monotonic() - started
                break
        assert seen is not None and seen < 1.0, seen
        assert out.read_bytes() == b'{"id": "done", "text": "x"}\n'


def test_the_writer_is_safe_from_several_threads(tmp_path):
    out = tmp_path / "out.jsonl"
    out.touch()
    with ResultWriter(out, sync_every=7, sync_seconds=0.01) as writer:
        threads = [threading.Thread(target=lambda t=t: [writer.write({"id": f"{t}-{i}"}) for i in range(200)])
                   for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    ids = [json.loads(x)["id"] for x in out.read_bytes().splitlines()]
    assert sorted(ids) == sorted(f"{t}-{i}" for t in range(4) for i in range(200))


def test_a_record_with_a_lone_surrogate_is_still_valid_json():
    record = {"id": "x\ud800", "text": "a\\\udfffé"}
    line = encode_record(record)
    line.decode("utf-8")
    assert json.loads(line) == record


def test_prepare_output_refusals_write_nothing(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    with pytest.raises(JobError, match="onto the input"):
        prepare_output(src, src, overwrite=True)
    assert src.read_text() == "{}\n"


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(tmp_path, capsys):
    from batchllm.io.job import OutputLock

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    out = tmp_path / "out.jsonl"
    with OutputLock(out):
        code, err = run(capsys, src, "-o", out)
        assert code == 2 and "another batchllm run is writing" in err, err
        code, err = run(capsys, src, "-o", out, "--overwrite")
        assert code == 2 and "another batchllm run" in err
    code, err = run(capsys, src, "-o", out, "--seed", str(2**64))  # the lock is free again; refused for the seed
    assert code == 2 and "seed" in err
    assert not out.exists(), "a refused job leaves no empty output behind"


# ---------------------------------------------------------------- issue 19: errors file, write failures
def test_errors_file_name_follows_the_output():
    from pathlib import Path

    from batchllm.io.job import errors_path_for

    assert errors_path_for(Path("/d/out.jsonl")) == Path("/d/out.errors.jsonl")
    assert errors_path_for(Path("results")) == Path("results.errors")  # (results.jsonl's is results.errors.jsonl)
    names = ["res.jsonl", "res", "res.json", "res.json.jsonl", "res.errors", "res.errors.jsonl", "a.b.jsonl", "a.b"]
    assert len({errors_path_for(Path(name)) for name in names}) == len(names)


def test_two_outputs_never_share_a_default_errors_file(tmp_path):
    """`run a.jsonl -o res.jsonl` (a failed OpenAI line) then `run b.jsonl -o res --overwrite`: both outputs' errors
    went to res.errors.jsonl, the second deleted the first's failed lines, and the first's own command was then
    refused ("holds records this job did not write")."""
    from batchllm.io.job import default_errors_path

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"custom_id": "a1", "body": {}}) + "\n")
    b.write_text("".join(json.dumps({"custom_id": f"b{i}", "body": {}}) + "\n" for i in (1, 2)))
    res_jsonl, res = tmp_path / "res.jsonl", tmp_path / "res"
    prepare_output(res_jsonl, a, False, default_errors_path(res_jsonl))
    failed = json.dumps({"id": "batch_req_1", "custom_id": "a1", "response": None,
                         "error": {"code": "invalid_request", "message": "line 1: bad"}}) + "\n"
    write_as_the_job(res_jsonl, default_errors_path(res_jsonl), failed)
    prepare_output(res, b, True, default_errors_path(res)).begin()
    assert default_errors_path(res) == tmp_path / "res.errors"
    assert (tmp_path / "res.errors.jsonl").read_text() == failed
    assert prepare_output(res_jsonl, a, False, default_errors_path(res_jsonl)).done_error_lines == {1}


def test_an_output_begun_under_the_earlier_default_keeps_its_errors_file(tmp_path):
    """An output named without .jsonl that an earlier version began recorded results.errors.jsonl as its errors file:
    the same command still resumes it from there; and an --overwrite that would delete an errors file another
    output's state file names is refused."""
    from batchllm.io.job import _write_state, default_errors_path

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"c{i}", "body": {}}) + "\n" for i in (1, 2)))
    results, earlier = tmp_path / "results", tmp_path / "results.errors.jsonl"
    prepare_output(results, src, False, earlier)  # (as the earlier version began it)
    failed = {"id": "r1", "custom_id": "c1", "response": None, "error": {"code": "bad", "message": "line 1: x"}}
    write_as_the_job(results, earlier, json.dumps(failed) + "\n")
    assert default_errors_path(results) == earlier
    assert prepare_output(results, src, False, default_errors_path(results)).done_error_lines == {1}
    other = tmp_path / "results.jsonl"  # another job whose state names that file (an earlier version's shared default)
    _write_state(state_path_for(other), {**json.loads(state_path_for(results).read_bytes())})
    with pytest.raises(JobError, match="holds the failed lines of .*results"):
        prepare_output(other, src, True, tmp_path / "results.errors.jsonl")
    assert earlier.stat().st_size > 0


def test_an_errors_file_that_is_a_device_or_another_jobs_is_not_deleted(tmp_path):
    """Starting a job over removes its errors file: `--errors-file` naming a device (/dev/null, as root) replaced the
    node with a regular file; and `-o x.errors.jsonl --overwrite` emptied job x's errors file (its state file names
    it), which x could then never resume. Both are refused, naming the file, before anything is written."""
    from batchllm.io.job import default_errors_path

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"c{i}", "body": {}}) + "\n" for i in (1, 2)))
    device = tmp_path / "fifo"
    os.mkfifo(device)
    with pytest.raises(JobError, match=r"cannot write the errors file '.*fifo': it is not a regular file \(a device "
                                       r"or a pipe\)"):
        prepare_output(tmp_path / "out.jsonl", src, True, device)
    assert stat.S_ISFIFO(os.stat(device).st_mode) and not (tmp_path / "out.jsonl").exists()
    x = tmp_path / "x.jsonl"
    prepare_output(x, src, False, default_errors_path(x))
    failed = json.dumps({"id": "r1", "custom_id": "c1", "response": None, "error": {"code": "bad", "message": "x"}})
    write_as_the_job(x, default_errors_path(x), failed + "\n")
    with pytest.raises(JobError, match=r"refusing to start '.*x.errors.jsonl' over: the output '.*x.errors.jsonl' "
                                       r"holds the failed lines of '.*x.jsonl'.*; choose another -o"):
        prepare_output(default_errors_path(x), src, True, tmp_path / "y.errors.jsonl")
    assert default_errors_path(x).read_text() == failed + "\n"


def test_overwrite_keeps_a_chosen_errors_file_that_holds_another_jobs_failed_lines(tmp_path):
    """`-o b.jsonl --errors-file shared.err --overwrite` deleted job a's failed lines in shared.err (its own
    --errors-file, whose name leads to no state file): a could never resume them. Refused, naming the file, unless
    the output's state file names the file as its own (then --overwrite starts it over, as before)."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"c{i}", "body": {}}) + "\n" for i in (1, 2)))
    a, b, shared = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "shared.err"
    prepare_output(a, src, False, shared)
    failed = json.dumps({"id": "r1", "custom_id": "c1", "response": None, "error": {"code": "bad", "message": "x"}})
    write_as_the_job(a, shared, failed + "\n")
    with pytest.raises(JobError, match=r"refusing to start '.*b.jsonl' over: its errors file '.*shared.err' holds "
                                       r"failed lines this job did not write"):
        prepare_output(b, src, True, shared)
    assert shared.read_text() == failed + "\n" and not b.exists()
    prepare_output(a, src, True, shared)  # a's own file: started over
    assert not shared.exists() or shared.stat().st_size == 0
    put_there = tmp_path / "put.err"  # no job wrote it
    put_there.write_text(failed + "\n")
    with pytest.raises(JobError, match="its errors file '.*put.err' holds failed lines this job did not write"):
        prepare_output(a, src, True, put_there)
    assert put_there.read_text() == failed + "\n"
    # c recorded the path as its errors file but wrote nothing there (no first line recorded); b's lines then went
    # into it: not c's, as a resume of c reads it
    c, later = tmp_path / "c.jsonl", tmp_path / "later.err"
    prepare_output(c, src, False, later)
    later.write_text(failed + "\n")
    with pytest.raises(JobError, match="its errors file '.*later.err' holds failed lines this job did not write"):
        prepare_output(c, src, True, later)
    assert later.read_text() == failed + "\n"


def test_resume_reads_both_files_and_repairs_a_torn_errors_line(tmp_path):
    src, out, errors = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"c{i}", "body": {}}) + "\n" for i in range(4)))
    assert prepare_output(out, src, overwrite=False, errors=errors).num_records == 0
    out.write_text(json.dumps({"id": "batch_req_1", "custom_id": "c0", "response": {}, "error": None}) + "\n")
    complete = json.dumps({"id": "batch_req_2", "custom_id": "c1", "response": None,
                           "error": {"code": "invalid_request", "message": "line 2: duplicate custom_id 'c0'"}}) + "\n"
    write_as_the_job(out, errors, complete + '{"id": "batch_req_3", "custom_id": "c2", "resp')
    state = prepare_output(out, src, overwrite=False, errors=errors)
    assert state.done_ids == {"c0"} and state.done_error_lines == {2} and state.num_records == 2
    assert state.repaired_bytes > 0 and errors.read_text() == complete, "the torn errors line is cut"
    assert state.repaired_files == [errors], "the resume note names the file cut (it named the output)"
    out.write_text("")  # only the errors file holds records: still a job to resume, not a fresh start
    assert prepare_output(out, src, overwrite=False, errors=errors).done_error_lines == {2}
    assert errors.read_text() == complete
    prepare_output(out, src, overwrite=True, errors=errors)
    assert not errors.exists(), "--overwrite starts the errors file over too"
    with pytest.raises(JobError, match="errors file"):
        prepare_output(out, src, overwrite=True, errors=src)


def test_an_errors_file_of_another_job_is_the_file_named(tmp_path):
    """A fresh output with a --errors-file that exists already was refused naming the output, which did
    not exist."""
    src, out, errors = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "precious.txt"
    src.write_text('{"id": "a", "prompt": "x"}\n')
    errors.write_text("keep me\n")
    with pytest.raises(JobError, match=r"refusing to write into '.*precious\.txt': this errors file exists, but "
                                       r"no out\.jsonl\.batchllm-state ties it .* choose another --errors-file"):
        prepare_output(out, src, overwrite=False, errors=errors)
    assert errors.read_text() == "keep me\n"


def test_an_errors_file_another_job_wrote_into_is_not_read_as_this_jobs(tmp_path, capsys, tiny_model_factory):
    """Two jobs sharing one --errors-file: job A (no failures yet, so no errors file) was interrupted, job B wrote its
    failed lines there, and A's resume read B's line numbers as its own failed lines: those lines of A were never
    answered, and A reported itself complete. The job's state file now records the errors file it created."""
    model = tiny_model_factory("llama")
    shared = tmp_path / "shared.errors.jsonl"
    job_a, job_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    job_a.write_text("".join(json.dumps({"custom_id": f"a{i}", "url": "/v1/completions", "method": "POST",
                                         "body": {"prompt": f"Hi {i}", "max_tokens": 2}}) + "\n"
                             for i in range(4)))
    job_b.write_text("".join(json.dumps({"custom_id": f"b{i}", "url": "/v1/completions", "method": "POST",
                                         "body": {"prompt": "x", "temperature": -5}}) + "\n"
                             for i in range(4)))
    options = ["--model", model, "--errors-file", shared]
    code, err = run(capsys, job_a, "-o", tmp_path / "A.jsonl", *options)
    assert code == 0 and not shared.exists(), err
    (tmp_path / "A.jsonl").write_text("".join((tmp_path / "A.jsonl").read_text().splitlines(keepends=True)[:1]))
    code, err = run(capsys, job_b, "-o", tmp_path / "B.jsonl", *options)
    assert code == 1 and len(shared.read_text().splitlines()) == 4, err
    code, err = run(capsys, job_a, "-o", tmp_path / "A.jsonl", *options)
    assert code == 2 and "holds records this job did not write" in err, err
    assert len((tmp_path / "A.jsonl").read_text().splitlines()) == 1, "nothing was skipped or written"
    # its own errors file, by its first line: resumed as its own, also copied elsewhere with its output (a backup
    # restored, another filesystem: another inode)
    code, err = run(capsys, job_b, "-o", tmp_path / "B.jsonl", *options)
    assert code == 1 and "already complete" in err, err
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("B.jsonl", "B.jsonl.batchllm-state"):
        shutil.copy(tmp_path / name, copy / name)
    shutil.copy(shared, copy / "errors.jsonl")
    shared.unlink()  # (restored elsewhere: the recorded path holds nothing)
    code, err = run(capsys, job_b, "-o", copy / "B.jsonl", "--model", model, "--errors-file", copy / "errors.jsonl")
    assert code == 1 and "already complete" in err, err


def test_an_errors_file_begun_by_the_previous_version_stays_the_jobs(tmp_path):
    """A state file of version 2 records no errors file: its job's failed lines, written then, are its own when it
    resumes and fails more lines (they were refused as another job's)."""
    src, out, errors = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"c{i}", "body": {}}) + "\n" for i in range(3)))
    prepare_output(out, src, overwrite=False, errors=errors)
    state_path = state_path_for(out)
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "version": 2}))
    earlier = {"id": "batch_req_1", "custom_id": "c0", "response": None,
               "error": {"code": "x", "message": "line 1: bad"}}
    errors.write_text(json.dumps(earlier) + "\n")
    assert prepare_output(out, src, overwrite=False, errors=errors).done_error_lines == {1}
    writer = ResultWriter(errors, lazy=True, on_open=functools.partial(claim_errors_file, out))
    try:
        writer.write({**earlier, "custom_id": "c1", "error": {"code": "x", "message": "line 2: bad"}})
    finally:
        writer.close()
    assert prepare_output(out, src, overwrite=False, errors=errors).done_error_lines == {1, 2}


def test_two_jobs_never_write_one_errors_file_at_once(tmp_path):
    """Two jobs that began before either failed both wrote the shared errors file, each resume reading the other's
    failed lines as its own. The job claims its errors file when it opens it: a lock for the job, and a file
    that holds records it did not begin is refused."""
    src, errors = tmp_path / "in.jsonl", tmp_path / "shared.errors.jsonl"
    src.write_text(json.dumps({"custom_id": "c0", "body": {}}) + "\n")
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for out in outs:
        prepare_output(out, src, overwrite=False, errors=errors)
    record = {"id": "batch_req_1", "custom_id": "c0", "response": None, "error": {"code": "x", "message": "line 1"}}
    first = ResultWriter(errors, lazy=True, on_open=functools.partial(claim_errors_file, outs[0]))
    second = ResultWriter(errors, lazy=True, on_open=functools.partial(claim_errors_file, outs[1]))
    try:
        first.write(record)
        with pytest.raises(JobError, match="another batchllm run is writing the errors file"):
            second.write(record)
        first.close()
        with pytest.raises(JobError, match="holds records this job did not write"):
            second.write(record)
    finally:
        first.close()
        second.close()
    assert len(errors.read_text().splitlines()) == 1
    with pytest.raises(JobError, match="holds records this job did not write"):
        prepare_output(outs[1], src, overwrite=False, errors=errors)


def test_a_job_starting_over_never_removes_an_errors_file_another_job_writes(tmp_path, monkeypatch):
    """A job starts its output after its model has loaded, and removed its errors file by name then. Where another
    job had begun writing that file meanwhile (the same --errors-file), the other job's failed lines went on into the
    removed file, lost, and both jobs reported their counts. The start now takes the file's lock first, and checks
    its content again; a job that opens the file as another's start removes it is refused too."""
    src, errors = tmp_path / "in.jsonl", tmp_path / "shared.jsonl"
    src.write_text(json.dumps({"custom_id": "c0", "body": {}}) + "\n")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    prepare_output(a, src, overwrite=False, errors=errors)
    b_loading = prepare_output(b, src, overwrite=False, errors=errors, defer_start=True)  # (no errors file yet)
    record = {"id": "batch_req_1", "custom_id": "c0", "response": None, "error": {"code": "x", "message": "line 1"}}
    writer = ResultWriter(errors, lazy=True, on_open=functools.partial(claim_errors_file, a))
    try:
        writer.write(record)  # a's first failed line: a holds the errors file from now on
        with pytest.raises(JobError, match="another batchllm run is writing its errors file"):
            b_loading.begin()
    finally:
        writer.close()
    assert errors.read_text() == encode_record(record).decode(), "a's failed line is still there"
    with pytest.raises(JobError, match="holds failed lines this job did not write"):
        prepare_output(b, src, overwrite=True, errors=errors)

    errors.unlink()  # b, with results, started over (--overwrite) while a writes the errors file: b's results stay
    b.write_text('{"id": "c0", "text": "b\'s"}\n')
    b_loading = prepare_output(b, src, overwrite=True, errors=errors, defer_start=True)
    writer = ResultWriter(errors, lazy=True, on_open=functools.partial(claim_errors_file, a))
    try:
        writer.write(record)
        with pytest.raises(JobError, match="another batchllm run is writing its errors file"):
            b_loading.begin()
    finally:
        writer.close()
    assert b.read_text() == '{"id": "c0", "text": "b\'s"}\n', "refused before the output is emptied"

    errors.unlink()  # a begun again; b loads its model; a writes its errors file and ends before b starts its output
    prepare_output(a, src, overwrite=True, errors=errors)
    b_loading = prepare_output(b, src, overwrite=True, errors=errors, defer_start=True)
    write_as_the_job(a, errors, json.dumps(record) + "\n")
    with pytest.raises(JobError, match="holds failed lines this job did not write"):
        b_loading.begin()  # (not locked any more, but it holds a's record)
    assert errors.read_text() == encode_record(record).decode()

    errors.unlink()
    real_lock = job._lock_exclusively

    def removed_before_locked(file, path):  # another job's start removes the file between our open and our lock
        path.unlink()
        real_lock(file, path)

    monkeypatch.setattr(job, "_lock_exclusively", removed_before_locked)
    writer = ResultWriter(errors, lazy=True, on_open=functools.partial(claim_errors_file, a))
    try:
        with pytest.raises(JobError, match="was removed while this job opened it"):
            writer.write(record)
    finally:
        writer.close()


def test_an_errors_file_that_is_another_jobs_output_is_refused(tmp_path):
    """`-o zz.jsonl`'s default errors file is zz.errors.jsonl: where another job writes its results there (`-o
    zz.errors.jsonl`), starting zz.jsonl deleted them (with --overwrite, or while that job ran), and that job's resume
    read zz.jsonl's failed lines as its own, never running its lines again. Such an errors file is refused."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\n')
    other = tmp_path / "zz.errors.jsonl"
    prepare_output(other, src, overwrite=False)  # the other job, begun (its state file is there)
    other.write_text('{"id": "a", "text": "its answer"}\n')
    for overwrite in (False, True):
        with pytest.raises(JobError, match="the output of another job"):
            prepare_output(tmp_path / "zz.jsonl", src, overwrite=overwrite, errors=other)
        with pytest.raises(JobError, match="the output of another job"):
            prepare_output(tmp_path / "mine.jsonl", src, overwrite=overwrite, errors=other)
    assert other.read_text() == '{"id": "a", "text": "its answer"}\n'
    assert not (tmp_path / "zz.jsonl").exists() and not state_path_for(tmp_path / "zz.jsonl").exists()


def test_the_errors_file_may_not_be_the_jobs_state_file(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\n')
    prepare_output(out, src, overwrite=False)
    with pytest.raises(JobError, match="must differ from the input, the output and its state file"):
        prepare_output(out, src, overwrite=False, errors=state_path_for(out))


def test_an_input_named_as_the_outputs_default_errors_file_is_refused_in_the_options_words(tmp_path):
    """`run x.errors.jsonl -o x.jsonl` was told to "choose another --errors-file", which it never gave: -o chose it.
    Still refused (an --overwrite would delete the input), naming -o."""
    from batchllm.io.job import default_errors_path

    out = tmp_path / "x.jsonl"
    src = default_errors_path(out)
    src.write_text('{"id": "a", "prompt": "x"}\n')
    with pytest.raises(JobError, match=r"the output's errors file would be '.*x.errors.jsonl' \(-o's name with "
                                       r"\.errors\), which is the input; choose another -o, or give --errors-file"):
        prepare_output(out, src, overwrite=True, errors=src)
    assert src.read_text() == '{"id": "a", "prompt": "x"}\n'


def test_a_write_failure_names_the_file_and_keeps_what_was_written(tmp_path):
    import errno

    from batchllm.io.job import OutputWriteError

    out = tmp_path / "out.jsonl"
    writer = ResultWriter(out, sync_every=1)
    writer.write({"id": "a"})
    writer.write({"id": "b"})

    def full_disk(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writer._file.flush = full_disk
    with pytest.raises(OutputWriteError) as failure:
        writer.write({"id": "c"})
    assert str(failure.value) == f"cannot write results to {out}: No space left on device"
    with pytest.raises(OutputWriteError):
        writer.write({"id": "d"})  # the failure stays: nothing is written after it
    writer.close()  # already reported: closing does not raise it again over the caller's handling
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()[:2]] == ["a", "b"]


def test_a_write_failure_during_run_exits_2_with_one_line_and_the_rerun_completes(
        tmp_path, capsys, monkeypatch, tiny_model_factory):
    import errno

    from batchllm.io import job

    model = tiny_model_factory("llama")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Count to {i}:", "max_tokens": 2 + i}) + "\n"
                           for i in range(6)))
    real_write = job.ResultWriter.write
    written = []

    def write_then_fill_the_disk(self, record):
        if len(written) == 3:
            raise job.OutputWriteError(self.path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        real_write(self, record)
        written.append(record["id"])

    monkeypatch.setattr(job.ResultWriter, "write", write_then_fill_the_disk)
    stats = tmp_path / "stats.json"
    code, err = run(capsys, src, "-o", out, "--model", model, "--temperature", "0", "--stats", stats)
    assert code == 2
    assert err.strip().splitlines()[-1] == f"batchllm: error: cannot write results to {out}: No space left on device"
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == written, "nothing written is lost"
    recorded = json.loads(stats.read_text())  # (it was not written: every other stopped run writes its stats)
    assert recorded["failed"] == f"cannot write results to {out}: No space left on device"
    assert (recorded["num_lines_done"], recorded["num_lines_left"]) == (3, 3), recorded
    monkeypatch.setattr(job.ResultWriter, "write", real_write)
    code, err = run(capsys, src, "-o", out, "--model", model, "--temperature", "0")
    assert code == 0, err
    assert sorted(json.loads(x)["id"] for x in out.read_text().splitlines()) == [f"r{i}" for i in range(6)]


@pytest.mark.parametrize("content", ["", "\n  \n\t\n", "\ufeff\n"])
def test_an_input_without_requests_says_so_and_writes_an_empty_output(tmp_path, capsys, monkeypatch, content):
    """An empty (or all-blank) input was reported as '... is already complete (0 lines ...); nothing to
    run (--overwrite starts over)'. As vLLM's run-batch does, the output is written empty and the exit
    is 0; the message names the input, on every run, and no model is loaded."""
    import batchllm.llm

    for name in ("LLM", "front_end_for"):  # (run reads the model's tokenizer first, then builds the engine)
        monkeypatch.setattr(batchllm.llm, name, lambda *a, **k: pytest.fail("no model is needed for no requests"))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(content)
    for extra in ([], [], ["--overwrite"]):
        code, err = run(capsys, src, "-o", out, *extra)
        assert code == 0 and err == (f"batchllm: {src} has no requests (it is empty or holds only blank lines); "
                                     f"wrote an empty {out}\n"), err
        assert out.read_bytes() == b""
        assert not (tmp_path / "out.errors.jsonl").exists()


def test_a_complete_job_finishes_without_loading_the_model(tmp_path, capsys, monkeypatch, tiny_model_factory):
    import batchllm.llm

    model = tiny_model_factory("llama")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi", "max_tokens": 2}\n\n{"id": "b", "prompt": ""}\n')
    code, err = run(capsys, "-i", src, "-o", out, "--model", model)
    assert code == 1, err  # line 3 failed
    assert "req/s" in err and "input tok/s" in err and "output tok/s" in err and "saved" in err

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a finished job")

    monkeypatch.setattr(batchllm.llm, "LLM", no_model)
    monkeypatch.setattr(batchllm.llm, "front_end_for", no_model)
    code, err = run(capsys, src, "-o", out, "--model", model, "--stats", tmp_path / "stats.json")
    assert code == 1 and "already complete (2 lines: 1 done, 1 failed)" in err
    stats = json.loads((tmp_path / "stats.json").read_text())  # (it was not written: a script read an old one)
    assert (stats["num_lines_done"], stats["num_lines_failed"], stats["num_lines_resumed"]) == (1, 1, 2)
    src.write_text("")
    code, err = run(capsys, src, "-o", tmp_path / "empty.jsonl", "--stats", tmp_path / "empty.json")
    assert code == 0 and json.loads((tmp_path / "empty.json").read_text())["num_lines_done"] == 0


def test_resuming_under_other_options_is_refused_by_name(tmp_path, capsys, tiny_model_factory):
    """A second run with other sampling defaults resumed silently, so one output held answers of two
    settings; a line refused under --max-logprobs stayed refused when the limit was raised. Options that
    decide answers are now recorded beside the output and must match to resume; speed options may change."""
    model = tiny_model_factory("llama")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Hi {i}"}) + "\n" for i in range(3))
                   + json.dumps({"id": "many", "prompt": "Hi", "logprobs": 3}) + "\n")
    first = ["--model", model, "--max-tokens", "3", "--temperature", "0", "--max-logprobs", "2"]
    code, err = run(capsys, src, "-o", out, *first)
    assert code == 1 and "max_logprobs" in (tmp_path / "out.jsonl").read_text(), err  # the 4th line is refused
    lines = out.read_text().splitlines(keepends=True)
    answered = [line for line in lines if json.loads(line).get("error") is None]
    out.write_text("".join(line for line in lines if line != answered[-1]))  # as if killed before that answer

    code, err = run(capsys, src, "-o", out, "--model", model, "--max-tokens", "2", "--temperature", "1",
                    "--max-logprobs", "5", "--response-role", "bot")
    assert code == 2 and "other options" in err and "max_tokens 3 -> 2" in err and "temperature 0.0 -> 1.0" in err
    assert "max_logprobs 2 -> 5" in err and "--overwrite" in err, err
    assert 'response_role (unset: assistant, the default) (unset) -> "bot"' in err, "the default named"
    assert out.read_text() == "".join(line for line in lines if line != answered[-1]), "the output is untouched"

    code, err = run(capsys, src, "-o", out, *first, "--max-num-batched-tokens", "64")  # speed alone: resumes
    assert code == 1 and "resuming" in err, err
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == ["many", "r0", "r1", "r2"]

    code, err = run(capsys, src, "-o", out, "--model", model, "--max-tokens", "3", "--temperature", "0",
                    "--overwrite")  # the default max_logprobs (20) accepts the 4th line
    assert code == 0, err
    assert all(json.loads(line).get("error") is None for line in out.read_text().splitlines())


def test_ids_keep_their_json_type_through_the_run_and_its_resume(tmp_path, capsys, tiny_model_factory):
    """The integer 9 and the string "9" were one id (the second line failed as a duplicate of the first)
    and the integer came back as the string "9": ids are now JSON values, echoed as given."""
    model = tiny_model_factory("llama")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": 9, "prompt": "Hi"}\n{"id": "9", "prompt": "Hi"}\n{"id": 9, "prompt": "again"}\n')
    options = ["--model", model, "--max-tokens", "2", "--temperature", "0"]
    code, err = run(capsys, src, "-o", out, *options)
    assert code == 1, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    answered = sorted((r["id"] for r in records if r.get("error") is None), key=repr)
    assert answered == ["9", 9]
    duplicate = [r for r in records if r.get("error")]
    assert len(duplicate) == 1 and duplicate[0]["id"] == 9 and duplicate[0]["error"]["line"] == 3

    kept = [line for line in out.read_text().splitlines(keepends=True) if json.loads(line).get("id") != 9]
    out.write_text("".join(kept))  # the integer id's answer and error lost, as if killed before them
    code, err = run(capsys, src, "-o", out, *options)
    assert code == 1 and "1 lines done" in err, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((repr(r["id"]), r.get("error") is None) for r in records) == [
        ("'9'", True), ("9", False), ("9", True)], "each line has exactly one record"


def test_an_openai_line_past_the_context_fails_as_openai_answers_it(tmp_path, capsys, tiny_model_factory):
    """A prompt and its own max_tokens past max_model_len were cut at the context with finish_reason
    "length" and status 200; OpenAI's API (and vLLM's server, which its run-batch uses) refuse them, and a
    completion's default 16 past it too (it ran to the context). A chat line without max_tokens, and a line taking
    the command line's --max-tokens, stop at the context."""
    model = tiny_model_factory("llama")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompt = "one two three four five six seven eight nine ten " * 5  # (with a completion's default 16: past 64)
    body = {"prompt": prompt, "temperature": 0}
    lines = [{"custom_id": "asks-too-much", "url": "/v1/completions", "body": {**body, "max_tokens": 40}},
             {"custom_id": "fits", "url": "/v1/completions", "body": {**body, "max_tokens": 4}},
             {"custom_id": "default", "url": "/v1/completions", "body": body},
             {"custom_id": "chat", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": prompt[:100]}], "temperature": 0}}]
    src.write_text("".join(json.dumps({"method": "POST", **line}) + "\n" for line in lines))
    code, err = run(capsys, src, "-o", out, "--model", model, "--max-model-len", "64", "--ignore-eos")
    assert code == 1, err
    errors = [json.loads(line) for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert [e["custom_id"] for e in errors] == ["asks-too-much", "default"]
    message = errors[0]["error"]["message"]
    assert "max_model_len) is 64 tokens" in message and "40 for the completion" in message, message
    assert "16 for the completion" in errors[1]["error"]["message"], errors[1]
    done = {r["custom_id"]: r["response"]["body"] for r in map(json.loads, out.read_text().splitlines())}
    assert done["fits"]["usage"]["completion_tokens"] == 4
    usage = done["chat"]["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 64, "a chat without max_tokens runs to the context"
    assert done["chat"]["choices"][0]["finish_reason"] == "length"
    src.write_text(json.dumps({"method": "POST", **lines[2]}) + "\n")
    code, err = run(capsys, src, "-o", out, "--model", model, "--max-model-len", "64", "--ignore-eos",
                    "--max-tokens", "16", "--overwrite")
    assert code == 0, err
    body = json.loads(out.read_text())["response"]["body"]
    assert body["choices"][0]["finish_reason"] == "length", "the command line's --max-tokens stops at the context"


def test_the_models_generation_config_sets_the_sampling_defaults(tmp_path, capsys, tiny_model_factory):
    """vLLM takes a model's sampling defaults from its generation_config.json (Qwen3: temperature 0.6,
    top_p 0.95, top_k 20); `run` used 1.0 / 1.0 / off whatever the model said. Now: the command line's
    options, then the model's, then run's own; a line's fields above all."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), model)
    (model / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 3, "eos_token_id": 2}))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Hi", "max_tokens": 2}\n')
    code, err = run(capsys, src, "-o", out, "--model", model, "--top-k", "5", "--ignore-eos", "--seed", "1")
    assert code == 0, err
    assert ("sampling defaults from the model's generation_config.json: temperature 0.6, top_p 0.95, "
            "max_tokens 3 (a line's own") in err, err  # top_k: the command line's
    tokens = {r["id"]: r["completion_tokens"] for r in map(json.loads, out.read_text().splitlines())}
    assert tokens == {"a": 3, "b": 2}
    options = json.loads((tmp_path / "out.jsonl.batchllm-state").read_text())["options"]
    assert (options["temperature"], options["top_p"], options["top_k"], options["max_tokens"]) == (0.6, 0.95, 5, 3)


def test_an_output_written_by_an_older_version_resumes_its_string_ids(tmp_path, capsys, tiny_model_factory):
    """Before ids kept their JSON type, the integer id 9 was written as "9" and the state file had no
    version: resuming such an output matches its ids as strings, so no line is answered twice."""
    model = tiny_model_factory("llama")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": 9, "prompt": "Hi"}\n{"id": "b", "prompt": "Hi"}\n')
    state = {"input": str(src.resolve()), **input_fingerprint(src)}  # version 1: no options, no version
    (tmp_path / "out.jsonl.batchllm-state").write_text(json.dumps(state) + "\n")
    out.write_text(json.dumps({"id": "9", "text": "old", "token_ids": [1], "finish_reason": "length",
                               "prompt_tokens": 2, "completion_tokens": 1}) + "\n")
    code, err = run(capsys, src, "-o", out, "--model", model, "--max-tokens", "2", "--temperature", "0")
    assert code == 0 and "1 lines done" in err, err
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == ["9", "b"]


def test_a_bad_generation_config_fails_the_job_before_anything_is_written(tmp_path, capsys, tiny_model_factory):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), model)
    (model / "generation_config.json").write_text('{"max_new_tokens": "3"}')
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi"}\n')
    code, err = run(capsys, src, "-o", out, "--model", model)
    assert code == 2 and "generation_config.json" in err and "max_tokens" in err, err
    assert not out.exists()


def test_a_ray_output_directory_is_tied_to_its_input_and_options(tmp_path):
    """`run --ray` restarted from its checkpoint by line number whatever the input and options: a changed
    input or --temperature mixed answers in one directory. Its directory now holds a state file too, which
    binds once results are there (a run that failed before writing any does not lock the directory)."""
    from batchllm.io.job import tie_directory_to_job

    src, shards = tmp_path / "in.jsonl", tmp_path / "shards"
    src.write_text('{"id": "a", "prompt": "Hi"}\n')
    options = {"model": None, "temperature": 0.0, "max_tokens": 4}
    tie_directory_to_job(shards, src, options)
    assert (shards / "job.batchllm-state").exists()
    tie_directory_to_job(shards, src, dict(options))  # the same job restarts
    tie_directory_to_job(shards, src, {**options, "temperature": 1.0})  # nothing written yet: a new start
    tie_directory_to_job(shards, src, options)
    (shards / "_checkpoint").mkdir()
    (shards / "_checkpoint" / "part.parquet").write_bytes(b"x")  # a result: the state is checked from now on
    with pytest.raises(JobError, match=r"other options \(temperature 0.0 -> 1.0\)"):
        tie_directory_to_job(shards, src, {**options, "temperature": 1.0})
    src.write_text('{"id": "a", "prompt": "Hello"}\n')
    with pytest.raises(JobError, match=r"its input '.*in.jsonl' has changed since the output was written \(28 bytes "
                                       r"then, 31 now\)"):  # (it said "a different input", naming the same file)
        tie_directory_to_job(shards, src, options)
    src.write_text('{"id": "a", "prompt": "Ho"}\n')  # (the same size: it said "28 bytes then, 28 now")
    with pytest.raises(JobError, match=r"has changed since the output was written \(the same 28 bytes, other "
                                       r"content: SHA-256 [0-9a-f]{12}\.\.\. then, [0-9a-f]{12}\.\.\. now\)"):
        tie_directory_to_job(shards, src, options)
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "b", "prompt": "Hello"}\n')
    with pytest.raises(JobError, match="written for a different input"):
        tie_directory_to_job(shards, other, options)
    (shards / "job.batchllm-state").unlink()  # results that no state file vouches for: another job's
    with pytest.raises(JobError, match="holds files but no job.batchllm-state, so no batchllm --ray job wrote it"):
        tie_directory_to_job(shards, src, options)


def test_a_chat_template_file_is_read_once_and_recorded_by_its_text(tmp_path, capsys, tiny_model_factory):
    """--chat-template was recorded as the path typed: an edited file resumed silently, and another
    spelling of the same path was refused. It is read once, before anything is written, and recorded by a
    digest of its text."""
    model = tiny_model_factory("llama")
    template, src, out = tmp_path / "t.jinja", tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    src.write_text("".join(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": f"Hi {i}"}]}) + "\n"
                           for i in range(2)))
    common = ["--model", model, "--max-tokens", "2", "--temperature", "0"]
    code, err = run(capsys, src, "-o", out, *common, "--chat-template", template)
    assert code == 0, err
    recorded = json.loads((tmp_path / "out.jsonl.batchllm-state").read_text())["options"]["chat_template"]
    assert recorded.startswith("sha256:")
    assert {r["prompt_tokens"] for r in map(json.loads, out.read_text().splitlines())} == {3}, "'Hi 0' alone: 3 tokens"
    out.write_text(out.read_text().splitlines(keepends=True)[0])
    template.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    code, err = run(capsys, src, "-o", out, *common, "--chat-template", tmp_path / "." / "t.jinja")
    assert code == 2 and "chat_template" in err and recorded in err, err
    code, err = run(capsys, src, "-o", tmp_path / "other.jsonl", *common, "--chat-template", tmp_path / "nope.jinja")
    assert code == 2 and "nope.jinja" in err and "renders `messages`" in err, err
    assert not (tmp_path / "other.jsonl").exists()


def test_run_says_which_fields_it_ignored(tmp_path, capsys, tiny_model_factory):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": 1, "prompt": "Hi", "max_tokens": 2, "rating": 5}\n{"id": 2, "prompt": "Hi", "rating": 1, '
                   '"max_tokens": 2}\n')
    code, err = run(capsys, src, "-o", out, "--model", tiny_model_factory("llama"))
    assert code == 0, err
    assert "batchllm: ignored fields that are not request fields: rating (2 lines)" in err
    assert len(out.read_text().splitlines()) == 2


# ---------------------------------------------------------------- session 33: the output's start and resume
def test_overwrite_empties_the_output_before_the_new_options_are_recorded(tmp_path, monkeypatch):
    """--overwrite wrote the new state file first and emptied the output after: a job killed between the two
    left the old answers under the new options, and the next run called them complete."""
    from batchllm.io import job

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\n')
    prepare_output(out, src, overwrite=False, options={"seed": 7})
    out.write_text(json.dumps({"id": "a", "output": "answered with seed 7"}) + "\n")
    seen = []
    write_state = job._write_state
    monkeypatch.setattr(job, "_write_state", lambda path, fp: (seen.append(out.read_text()), write_state(path, fp)))
    prepare_output(out, src, overwrite=True, options={"seed": 8})
    assert seen == [""], "the new options were recorded over an output still holding the old answers"


def test_a_failure_to_start_the_output_names_the_file(tmp_path, monkeypatch):
    import errno

    from batchllm.io import job

    def full(path, fingerprint):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\n')
    monkeypatch.setattr(job, "_write_state", full)
    with pytest.raises(JobError, match=r"cannot write the output's state file .*out\.jsonl\.batchllm-state: "
                                       r"No space left on device"):  # (the file that failed, not the output)
        prepare_output(out, src, overwrite=False, options={})


def test_an_output_that_is_not_a_regular_file_is_refused_by_name(tmp_path, capsys):
    """-o /dev/null failed with a bare "[Errno 22] Invalid argument" (fsync of a device) and left
    /dev/null.batchllm-state behind; a pipe blocked the open."""
    src, fifo = tmp_path / "in.jsonl", tmp_path / "results.pipe"
    src.write_text('{"id": "a", "prompt": "x"}\n')
    os.mkfifo(fifo)
    code, err = run(capsys, src, "-o", fifo)
    assert code == 2 and "is not a regular file" in err and "results.pipe" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "results.pipe"]


def test_resume_reads_the_output_a_line_at_a_time(tmp_path):
    """Resuming read the whole output and split it into a second copy: twice the output's size in memory, 20 GB
    for a 10 GB output with logprobs."""
    import tracemalloc

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": "x"}) + "\n" for i in range(40)))
    prepare_output(out, src, overwrite=False, options={})
    complete = "".join(json.dumps({"id": i, "output": "y" * 1_000_000}) + "\n" for i in range(39))
    out.write_text(complete + complete[:500])
    tracemalloc.start()
    try:
        state = prepare_output(out, src, overwrite=False, options={})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert state.done_ids == set(range(39)) and state.repaired_bytes == 500
    assert out.read_text() == complete
    assert peak < 8_000_000, f"resume held {peak / 1e6:.0f} MB for a 39 MB output"


def test_the_default_model_by_its_path_resumes_a_job_run_without_model(tmp_path, capsys, default_model_dir):
    """`--model ~/.cache/batchllm/SmolLM2-135M-Instruct` after a run without --model was refused as
    'model (unset) -> ...', though it is the same model."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi"}\n')
    code, err = run(capsys, src, "-o", out, "--max-tokens", "2")
    assert code == 0, err
    code, err = run(capsys, src, "-o", out, "--max-tokens", "2", "--model", default_model_dir)
    assert code == 0 and "already complete" in err, err


def test_resuming_with_another_errors_file_is_refused_while_the_first_holds_failures(tmp_path):
    """A resume with another --errors-file ran the failed lines again and wrote them into the new file too: the
    same failures in two files. The state file records the errors file; a missing or empty one lets it change."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    first, second = tmp_path / "first.errors.jsonl", tmp_path / "second.errors.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"c{i}", "body": {}}) + "\n" for i in range(2)))
    prepare_output(out, src, overwrite=False, errors=first, options={})
    out.write_text(json.dumps({"id": "batch_req_1", "custom_id": "c0", "response": {}, "error": None}) + "\n")
    assert prepare_output(out, src, overwrite=False, errors=first, options={}).done_ids == {"c0"}, "none failed"
    write_as_the_job(out, first, json.dumps({"id": "batch_req_2", "custom_id": "c1", "response": None,
                                             "error": {"code": "invalid_request", "message": "line 2: bad"}}) + "\n")
    with pytest.raises(JobError, match=r"its failed lines are in '.*first\.errors\.jsonl'.*--errors-file"):
        prepare_output(out, src, overwrite=False, errors=second, options={})
    assert prepare_output(out, src, overwrite=False, errors=first, options={}).done_error_lines == {2}
    first.rename(second)  # moved by hand: resumes from where it now is
    assert prepare_output(out, src, overwrite=False, errors=second, options={}).done_error_lines == {2}


def test_a_plain_job_never_writing_an_errors_file_needs_none_writable(tmp_path, capsys, tiny_model_factory):
    """A plain JSONL job was refused because its errors file could not be written, though only OpenAI Batch lines'
    errors go there (a plain line's error is a record of the output): the file is checked where the input may hold
    such a line, and nowhere else."""
    model = tiny_model_factory("llama")
    src, out, errors = tmp_path / "in.jsonl", tmp_path / "out.jsonl", Path("/proc/e.jsonl")  # (root may, /proc not)
    src.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "hi", "temperature": -1}\n')
    code, err = run(capsys, src, "-o", out, "--errors-file", errors, "--model", model, "--max-tokens", "2")
    assert code == 1 and "2 lines: 1 done, 1 failed" in err, err
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == ["a", "b"]

    src.write_text(json.dumps({"custom_id": "o", "method": "POST", "url": "/v1/completions",
                               "body": {"prompt": "Hi"}}) + "\n")
    code, err = run(capsys, src, "-o", tmp_path / "o2.jsonl", "--errors-file", errors, "--model", model)
    assert code == 2 and "cannot write the errors file '/proc/e.jsonl'" in err, err


def _openai_job(tmp_path, tiny_model_factory):
    """(input, output, options) of an OpenAI Batch job of one good line and one that fails."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"custom_id": k, "method": "POST", "url": "/v1/completions",
                                       "body": {"prompt": "Hi", **extra}}) + "\n"
                           for k, extra in (("good", {}), ("bad", {"temperature": -1}))))
    return src, out, ["--model", tiny_model_factory("llama"), "--max-tokens", "2"]


def test_a_job_resumed_with_another_errors_file_records_it(tmp_path, capsys, tiny_model_factory):
    """Resumed with a renamed --errors-file, the state file kept the old path: a later run naming the old file was
    accepted and ran the failed lines again into it (recorded twice). The state records the errors file the job
    writes now, so the old name is refused, naming the new one."""
    src, out, options = _openai_job(tmp_path, tiny_model_factory)
    code, err = run(capsys, src, "-o", out, *options)
    assert code == 1, err
    renamed = tmp_path / "renamed.errors.jsonl"
    (tmp_path / "out.errors.jsonl").rename(renamed)
    out.write_text("")  # the good line is left to run
    code, err = run(capsys, src, "-o", out, "--errors-file", renamed, *options)
    assert code == 1 and "2 lines: 1 done, 1 failed (1 run now)" in err, err
    assert json.loads(state_path_for(out).read_text())["errors_file"] == str(renamed.resolve())
    code, err = run(capsys, src, "-o", out, *options)  # (the default errors file, the old name)
    assert code == 2 and f"its failed lines are in {str(renamed.resolve())!r}" in err, err
    assert not (tmp_path / "out.errors.jsonl").exists() and len(renamed.read_text().splitlines()) == 1


def test_a_copied_openai_job_is_the_same_job(tmp_path, capsys, tiny_model_factory):
    """A finished OpenAI job copied elsewhere (its output, errors and state files) was refused while the original
    errors file still held records at the absolute path its state file records, though a copied job is the same job
    (`ERRORS_FIRST_LINE`): an errors file beside the copy that begins as the job's did is the job's own."""
    import shutil

    src, out, options = _openai_job(tmp_path, tiny_model_factory)
    code, err = run(capsys, src, "-o", out, *options)
    assert code == 1, err
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("out.jsonl", "out.errors.jsonl", "out.jsonl.batchllm-state"):
        shutil.copy(tmp_path / name, copy / name)
    code, err = run(capsys, src, "-o", copy / "out.jsonl", *options)
    assert code == 1 and "already complete (2 lines: 1 done, 1 failed)" in err, err

    (copy / "out.jsonl").write_text("")  # the copy resumes too, and from then on names its own errors file
    code, err = run(capsys, src, "-o", copy / "out.jsonl", *options)
    assert code == 1 and "2 lines: 1 done, 1 failed (1 run now)" in err, err
    errors = (copy / "out.errors.jsonl").resolve()
    assert json.loads(state_path_for(copy / "out.jsonl").read_text())["errors_file"] == str(errors)
    assert len(errors.read_text().splitlines()) == 1


def test_a_ray_directory_set_aside_for_overwrite_is_restored_discarded_or_recovered(tmp_path):
    """`run --ray --overwrite` sets the directory's results aside (deleted once a replica has loaded the model, put
    back where none did); a process killed midway (`.moving` left) has its entries moved back by the next run."""
    from batchllm.io.job import (
        OVERWRITTEN,
        discard_overwritten,
        recover_overwrite,
        restore_overwritten,
        set_aside_for_overwrite,
        tie_directory_to_job,
    )

    src, shards = tmp_path / "in.jsonl", tmp_path / "shards"
    src.write_text('{"id": "a", "prompt": "Hi"}\n')
    tie_directory_to_job(shards, src, {"temperature": 0.0})
    (shards / "_checkpoint").mkdir()
    (shards / "_checkpoint" / "w.parquet").write_bytes(b"PAR1")
    (shards / "w_000000.jsonl").write_text('{"id": "a", "text": "old"}\n')
    contents = lambda: {str(p.relative_to(shards)): p.read_bytes() for p in shards.rglob("*") if p.is_file()}  # noqa: E731
    before = contents()

    set_aside_for_overwrite(shards)
    assert [p.name for p in shards.iterdir()] == [OVERWRITTEN]
    tie_directory_to_job(shards, src, {"temperature": 1.0})  # what is set aside is no result of the new job
    assert restore_overwritten(shards) and contents() == before
    assert not restore_overwritten(shards)  # (nothing set aside: nothing to do)

    set_aside_for_overwrite(shards)
    discard_overwritten(shards)
    discard_overwritten(shards)  # (every replica calls it)
    assert list(shards.iterdir()) == [] and not restore_overwritten(shards)

    tie_directory_to_job(shards, src, {"temperature": 0.0})
    (shards / "w_000000.jsonl").write_text('{"id": "a", "text": "old"}\n')
    moving = shards / (OVERWRITTEN + ".moving")  # killed while setting aside: the shard moved, the state file not
    moving.mkdir()
    os.replace(shards / "w_000000.jsonl", moving / "w_000000.jsonl")
    recover_overwrite(shards)
    assert sorted(p.name for p in shards.iterdir()) == ["job.batchllm-state", "w_000000.jsonl"]


def test_spellings_of_one_option_value_and_options_that_decide_nothing_resume():
    """--kv-cache-dtype fp8_e4m3 after fp8, --load-format safetensors after auto (documented aliases) and
    --trust-remote-code given or not (it runs no code here) refused the resume as other options."""
    from batchllm.io.job import _refuse_other_options

    recorded = {"kv_cache_dtype": "fp8", "load_format": "auto", "trust_remote_code": False, "max_tokens": 3,
                "eos_token_ids": [2, 3]}  # (a list: no alias lookup)
    for now in ({**recorded, "kv_cache_dtype": "fp8_e4m3", "load_format": "safetensors"},
                {k: v for k, v in recorded.items() if k != "trust_remote_code"},
                {**recorded, "trust_remote_code": True}):
        _refuse_other_options(Path("o.jsonl"), recorded, now)
    with pytest.raises(JobError, match='kv_cache_dtype "fp8" -> "auto"'):
        _refuse_other_options(Path("o.jsonl"), recorded, {**recorded, "kv_cache_dtype": "auto"})
    with pytest.raises(JobError, match='load_format "auto" -> "dummy"'):
        _refuse_other_options(Path("o.jsonl"), recorded, {**recorded, "load_format": "dummy"})
    with pytest.raises(JobError, match=r"eos_token_ids \[2, 3\] -> \[2\]"):
        _refuse_other_options(Path("o.jsonl"), recorded, {**recorded, "eos_token_ids": [2]})


def test_an_input_changed_as_the_job_starts_leaves_an_overwritten_output_as_it_was(tmp_path, capsys, monkeypatch,
                                                                                    tiny_model_factory):
    """The job reads its lines while the model loads, and started its output (--overwrite: emptied) before it knew
    they were the bytes it was tied to: an input changed meanwhile lost the earlier results, and wrote no --stats.
    The lines are now read before the output is started."""
    model = tiny_model_factory("llama")
    src, out, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": "Hi", "max_tokens": 2}) + "\n" for i in range(3)))
    common = ["--model", model, "--device", "cpu", "--num-kv-blocks", "64"]
    assert run(capsys, src, "-o", out, *common)[0] == 0
    before = out.read_bytes()
    real = cli.prepare_lines

    def changed_while_loading(path, *args, **kwargs):
        with open(path, "a") as f:
            f.write(json.dumps({"id": "late", "prompt": "Hi"}) + "\n")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cli, "prepare_lines", changed_while_loading)
    code, err = run(capsys, src, "-o", out, "--overwrite", "--stats", stats, *common)
    assert code == 2 and "changed while the job read it" in err, err
    assert out.read_bytes() == before, "the earlier results are as they were"
    assert "changed while the job read it" in json.loads(stats.read_text())["failed"]
