"""`run --ray` holds a lock on OUT_DIR (`io.job.OutputLock.for_directory`) and counts lines, not records: two jobs on
one OUT_DIR both ran and wrote every line twice, and the doubled records then made the job 'complete' with
num_lines_left -40. A line holding only the UTF-8 BOM is blank under --ray as without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchllm import cli
from batchllm.io.job import DIRECTORY_LOCK, JobError, OutputLock

pytest.importorskip("ray.data")


def run(capsys, *args):
    code = cli.main(["run", *map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


def committed_shard(output_dir: Path, base: str, records: list[dict], lines: list[int]) -> None:
    """A shard and its committed checkpoint entry, as Ray Data writes them (the entry holds the rows' `line` ids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (output_dir / "_checkpoint").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"line": lines}), output_dir / "_checkpoint" / f"{base}.parquet")
    (output_dir / f"{base}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def fake_ray_job(monkeypatch, calls: list):
    """`run --ray` with Ray taken as started and its job replaced by one writing a record per line."""
    import ray

    from batchllm.ray import jsonl_job

    def job(input_path, output_dir, *args, **kwargs):
        calls.append(output_dir)
        lines = [json.loads(x) for x in input_path.read_text().splitlines()]
        committed_shard(output_dir, f"job{len(calls)}_000000", [{"id": x["id"], "text": "t"} for x in lines],
                        list(range(1, len(lines) + 1)))
        kwargs["on_written"]()
        count = jsonl_job.count_shard_records(output_dir)
        return {"num_records": count.num_records, "num_errors": count.num_errors, "wall_s": 0.0}

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(jsonl_job, "run_jsonl_on_ray", job)


def test_a_second_job_on_a_locked_output_directory_is_refused_and_leaves_it_alone(tmp_path, capsys, monkeypatch):
    calls: list = []
    fake_ray_job(monkeypatch, calls)
    src, out = tmp_path / "in.jsonl", tmp_path / "shards"
    src.write_text("".join(json.dumps({"id": f"p{k}", "prompt": "Hi"}) + "\n" for k in range(4)))
    with OutputLock.for_directory(out):  # the first job, running: it has written half its lines
        committed_shard(out, "first_000000", [{"id": "p0", "text": "t"}, {"id": "p1", "text": "t"}], [1, 2])
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        for extra in ([], ["--overwrite"]):  # refused, before anything in OUT_DIR is set aside or written
            code, err = run(capsys, src, "-o", out, "--ray", *extra)
            assert code == 2 and not calls, err
            assert f"another batchllm run is writing {str(out)!r} (it holds its lock)" in err
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_job_holds_its_output_directory_s_lock_while_it_runs(tmp_path, capsys, monkeypatch):
    from batchllm.ray import jsonl_job

    calls: list = []
    fake_ray_job(monkeypatch, calls)
    job, refusals = jsonl_job.run_jsonl_on_ray, []

    def job_tried_twice(input_path, output_dir, *args, **kwargs):
        try:
            with OutputLock.for_directory(output_dir):
                pass
        except JobError as e:
            refusals.append(str(e))
        return job(input_path, output_dir, *args, **kwargs)

    monkeypatch.setattr(jsonl_job, "run_jsonl_on_ray", job_tried_twice)
    src, out = tmp_path / "in.jsonl", tmp_path / "shards"
    src.write_text("".join(json.dumps({"id": f"p{k}", "prompt": "Hi"}) + "\n" for k in range(4)))
    code, err = run(capsys, src, "-o", out, "--ray")
    assert code == 0 and len(calls) == 1 and "it holds its lock" in refusals[0], err
    assert jsonl_job.count_shard_records(out) == (4, 0, 0)
    assert not (out / DIRECTORY_LOCK).exists()  # (removed with the lock: no result of the job)
    code, err = run(capsys, src, "-o", out, "--ray")  # released at the end: the same command finds it complete
    assert code == 0 and "is already complete (4 lines: 4 done, 0 failed)" in err, err


def test_duplicate_records_never_make_a_job_complete_and_are_said(tmp_path, capsys, monkeypatch):
    calls: list = []
    fake_ray_job(monkeypatch, calls)
    src, out, stats = tmp_path / "in.jsonl", tmp_path / "shards", tmp_path / "stats.json"
    src.write_text("".join(json.dumps({"id": f"p{k}", "prompt": "Hi"}) + "\n" for k in range(4)))
    code, err = run(capsys, src, "-o", out, "--ray", "--max-tokens", "2")
    assert code == 0 and len(calls) == 1, err
    (out / "_checkpoint" / "job1_000000.parquet").unlink()  # lines 3, 4 left; lines 1, 2 written twice (old version)
    (out / "job1_000000.jsonl").unlink()
    committed_shard(out, "a_000000", [{"id": "p0", "text": "t"}, {"id": "p1", "text": "t"}], [1, 2])
    committed_shard(out, "b_000000", [{"id": "p0", "text": "t"}, {"id": "p1", "error": {"message": "m"}}], [1, 2])
    from batchllm.ray.jsonl_job import count_shard_records

    assert count_shard_records(out) == (2, 0, 2)
    code, err = run(capsys, src, "-o", out, "--ray", "--max-tokens", "2", "--stats", stats)
    assert "already complete" not in err and len(calls) == 2, err
    assert "holds 2 duplicate records" in err and code == 0
    assert json.loads(stats.read_text())["num_lines_left"] == 0
    assert json.loads(stats.read_text())["num_records"] == 4


def test_a_line_of_only_the_bom_is_blank_under_ray_as_without_it(tmp_path):
    """The first line or any other (where a file joined with `cat` began): `jsonl.without_bom` strips it on every
    line, as `_JsonlLines`' docstring now says (it named the first line alone)."""
    from batchllm.io.ingest import count_input_lines
    from batchllm.ray.jsonl_job import _JsonlLines

    src = tmp_path / "bom.jsonl"
    src.write_bytes(b'\xef\xbb\xbf\n{"id": "a", "prompt": "Hi"}\n\n{"id": "b", "prompt": "Hi"}\n\xef\xbb\xbf \r\n'
                    b'\xef\xbb\xbf{"id": "c", "prompt": "Hi"}\n')
    with open(src, "rb") as f:
        rows = [row for table in _JsonlLines([str(src)])._read_stream(f, str(src)) for row in table.to_pylist()]
    assert [row["line"] for row in rows] == [2, 4, 6]
    assert len(rows) == count_input_lines(src)


def stopped_ray_job(monkeypatch, calls: list, loaded: bool):
    """`run --ray` whose job is stopped by SIGINT: after a replica loaded the model (`on_loaded`: what --overwrite set
    aside is deleted) and one line's shard was committed, or (`loaded` False) before any replica loaded it."""
    import os
    import signal
    import time

    import ray

    from batchllm.ray import jsonl_job

    def job(input_path, output_dir, *args, on_loaded=None, **kwargs):
        calls.append(output_dir)
        if loaded:
            on_loaded()
            committed_shard(output_dir, "stopped_000000", [{"id": "p0", "text": "new"}], [1])
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # (the handler raises Interrupted here)

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(jsonl_job, "run_jsonl_on_ray", job)


def test_a_stopped_ray_overwrite_says_what_to_run_and_what_the_directory_holds(tmp_path, capsys, monkeypatch):
    """A stopped `run --ray --overwrite` said "run the same command to resume", but that command sets OUT_DIR aside
    again and computes its committed lines anew; stopped before any replica loaded the model, it said '0 records in
    OUT_DIR' while the earlier results were put back there."""
    src, out, stats = tmp_path / "in.jsonl", tmp_path / "shards", tmp_path / "stats.json"
    src.write_text("".join(json.dumps({"id": f"p{k}", "prompt": "Hi"}) + "\n" for k in range(4)))
    calls: list = []
    fake_ray_job(monkeypatch, calls)
    assert run(capsys, src, "-o", out, "--ray")[0] == 0  # the earlier job: 4 lines answered

    stopped_ray_job(monkeypatch, calls, loaded=True)
    code, err = run(capsys, src, "-o", out, "--ray", "--overwrite")
    assert code == 130, err
    assert ("1 of 4 lines have results, 0 failed (recorded with an error), 3 left: 1 records in "
            f"{out}; run the same command without --overwrite to resume (with --overwrite, the lines written so far "
            "would be computed again)") in err, err
    from batchllm.ray import jsonl_job

    def the_rest(input_path, output_dir, *args, on_written=None, **kwargs):  # (the hint holds: line 1 is kept)
        assert jsonl_job.count_shard_records(output_dir) == (1, 0, 0)
        committed_shard(output_dir, "rest_000000", [{"id": f"p{k}", "text": "t"} for k in (1, 2, 3)], [2, 3, 4])
        on_written()
        return {"num_records": 4, "num_errors": 0, "wall_s": 0.0}

    monkeypatch.setattr(jsonl_job, "run_jsonl_on_ray", the_rest)
    assert run(capsys, src, "-o", out, "--ray")[0] == 0
    assert [p.name for p in sorted(out.glob("*.jsonl"))] == ["rest_000000.jsonl", "stopped_000000.jsonl"]

    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    stopped_ray_job(monkeypatch, calls, loaded=False)
    code, err = run(capsys, src, "-o", out, "--ray", "--overwrite", "--stats", stats)
    assert code == 130, err
    assert (f"interrupted (SIGINT) before any replica loaded the model: {out} was not started over and holds its "
            "earlier results: 4 of 4 lines have results, 0 failed (recorded with an error), 0 left; run the same "
            "command to start over, or it without --overwrite to resume them") in err, err
    assert "no replica loaded the model" not in err  # (said once)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert json.loads(stats.read_text())["num_lines_recorded"] == 4

    code, err = run(capsys, src, "-o", out, "--ray", "--overwrite", "--max-tokens", "3")  # (another job's options)
    assert code == 130 and "holds its earlier records (of other options or another input)" in err, err
    assert "without --overwrite" not in err


def test_overwrite_refuses_a_directory_holding_what_no_ray_job_writes(tmp_path, capsys, monkeypatch):
    """`run --ray -o OUT --overwrite` set aside, then deleted, every entry of OUT: a plain job's output being written
    there (its records lost while it reported success), a nested --ray job's directory (its state file gone, so it
    could never resume), the job's own input. Such a directory is refused, naming what it holds; one holding the
    job's own entries alone is started over as before."""
    calls: list = []
    fake_ray_job(monkeypatch, calls)
    src, out = tmp_path / "in.jsonl", tmp_path / "shards"
    src.write_text("".join(json.dumps({"id": f"p{k}", "prompt": "Hi"}) + "\n" for k in range(4)))
    assert run(capsys, src, "-o", out, "--ray")[0] == 0
    for name, make in (("plain.jsonl", lambda p: p.write_text('{"id": "a", "text": "its"}\n')),
                       ("sub", lambda p: (p.mkdir(), (p / "job.batchllm-state").write_text("{}"))),
                       ("in.jsonl", lambda p: p.write_text(src.read_text()))):
        make(out / name)
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        code, err = run(capsys, src, "-o", out, "--ray", "--overwrite")
        assert code == 2 and f"refusing --overwrite of {str(out)!r}: it holds '{name}'" in err, err
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        assert len(calls) == 1
        (out / name).unlink() if (out / name).is_file() else __import__("shutil").rmtree(out / name)
    code, err = run(capsys, src, "-o", out, "--ray", "--overwrite")
    assert code == 0 and len(calls) == 2, err


def test_an_overwrite_killed_before_any_replica_loaded_leaves_the_earlier_results_to_the_next_run(
        tmp_path, capsys, monkeypatch):
    """A `--ray --overwrite` killed (SIGKILL, or SIGTERM before Ray's handler) after setting the earlier results aside
    but before any replica loaded the model left them aside; the same command without --overwrite then ran every
    line again and deleted them once a replica loaded. They are put back first: the job is found complete."""
    from batchllm.io.job import OVERWRITTEN, set_aside_for_overwrite, tie_directory_to_job

    calls: list = []
    fake_ray_job(monkeypatch, calls)
    src, out = tmp_path / "in.jsonl", tmp_path / "shards"
    src.write_text("".join(json.dumps({"id": f"p{k}", "prompt": "Hi"}) + "\n" for k in range(4)))
    assert run(capsys, src, "-o", out, "--ray")[0] == 0
    options = json.loads((out / "job.batchllm-state").read_text())["options"]
    set_aside_for_overwrite(out)  # the killed --overwrite: set aside, tied anew, then killed
    tie_directory_to_job(out, src, options)
    assert (out / OVERWRITTEN).is_dir()
    code, err = run(capsys, src, "-o", out, "--ray")
    assert code == 0 and "are back" in err and "is already complete (4 lines: 4 done, 0 failed)" in err, err
    assert len(calls) == 1 and not (out / OVERWRITTEN).exists()


def test_a_plain_output_may_not_take_the_name_of_a_ray_directory_s_lock(tmp_path, capsys):
    """`run -o OUT/.batchllm-lock` wrote its results there, and the next `run --ray -o OUT` removed the file with
    its lock when it ended."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    code, err = run(capsys, src, "-o", tmp_path / "out" / DIRECTORY_LOCK)
    assert code == 2 and "names the lock file of a `run --ray` output directory" in err, err
    assert not (tmp_path / "out").exists()


def test_the_ray_read_reads_the_input_the_job_is_tied_to(tmp_path):
    """The input changed between the job's start (its state file ties it to the file's bytes) and Ray's read ran
    the new lines: the records answered other requests, and the job was then 'already complete' once the
    original was back. The read task now checks the file before its first row and what it read after its last."""
    from batchllm.io.job import InputChanged, input_fingerprint
    from batchllm.ray.jsonl_job import _JsonlLines

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{k}", "prompt": "Hi"}) + "\n" for k in range(5)))
    tied = input_fingerprint(src)
    tied = (tied["input_size"], tied["input_sha256"])

    def rows(**kwargs):
        with open(src, "rb") as f:
            return [r for t in _JsonlLines([str(src)], rows_per_block=2, **kwargs)._read_stream(f, str(src))
                    for r in t.to_pylist()]

    assert len(rows(input_read=tied)) == 5
    src.write_text(src.read_text().replace("Hi", "Ho"))
    with pytest.raises(InputChanged, match="changed while the job read it"):
        rows(input_read=tied)
    assert len(rows()) == 5, "a read not tied to a job (a library's dataset) reads what is there"


def test_a_task_s_write_failure_is_one_line_with_stats(tmp_path, capsys, monkeypatch):
    """A full disk under --ray printed Ray's whole worker traceback (ANSI colours included) after 'cannot write
    results to ...', and no --stats: the error a task raised is found under Ray's wrappers and said as `run`
    says it."""
    from batchllm.ray import jsonl_job

    class RayTaskErrorLike(RuntimeError):  # (Ray's: the task's error as `cause`, its traceback as the text)
        def __init__(self, cause):
            super().__init__("\x1b[36mray::Write()\x1b[39m (pid=1)\nTraceback ...\n" * 30)
            self.cause = cause

    def full(*args, **kwargs):
        raise RayTaskErrorLike(OSError(28, "No space left on device", str(tmp_path / "out" / "a_000000.jsonl")))

    fake_ray_job(monkeypatch, [])
    monkeypatch.setattr(jsonl_job, "run_jsonl_on_ray", full)
    src, out, stats = tmp_path / "in.jsonl", tmp_path / "out", tmp_path / "stats.json"
    src.write_text("".join(json.dumps({"id": f"p{k}", "prompt": "Hi"}) + "\n" for k in range(3)))
    code, err = run(capsys, src, "-o", out, "--ray", "--stats", stats)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot write results to {str(out)!r}: No space left on device" in err and "Traceback" not in err
    written = json.loads(stats.read_text())
    assert "No space left on device" in written["failed"] and written["num_lines_left"] == 3


def test_a_task_s_failure_on_another_file_is_named_as_such(tmp_path, capsys, monkeypatch):
    """Every OSError of a task was 'cannot write results' (an input moved away as well), and the count of the
    input's lines for --stats then failed with exit 3; a JobError a task raised (the input changed) is said in its
    own words, without a second instruction."""
    import pickle

    from batchllm.io.job import input_changed
    from batchllm.ray import jsonl_job

    class RayTaskErrorLike(RuntimeError):
        def __init__(self, cause):
            super().__init__("Traceback ...")
            self.cause = cause

    src, out, stats = tmp_path / "in.jsonl", tmp_path / "out", tmp_path / "stats.json"
    src.write_text("".join(json.dumps({"id": f"p{k}", "prompt": "Hi"}) + "\n" for k in range(3)))
    fake_ray_job(monkeypatch, [])
    for cause, said in ((FileNotFoundError(2, "No such file or directory", str(tmp_path / "gone.jsonl")),
                         f"a task of the job failed on {str(tmp_path / 'gone.jsonl')!r}: No such file or directory"),
                        (pickle.loads(pickle.dumps(input_changed(src, (1, "x"), 2))), "changed while the job read it")):
        def failing(*args, cause=cause, **kwargs):
            raise RayTaskErrorLike(cause)

        monkeypatch.setattr(jsonl_job, "run_jsonl_on_ray", failing)
        code, err = run(capsys, src, "-o", out, "--ray", "--stats", stats)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
        assert "committed so far" not in err
        assert json.loads(stats.read_text())["num_lines_left"] == 3
