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
