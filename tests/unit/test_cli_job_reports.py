"""What `batchllm run` says about a job it stops, finds complete or refuses, on a tiny model (no Ray needed
except where a test says so)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from batchllm import cli


def run(capsys, *args):
    code = cli.main(["run", *map(str, args), "--no-progress"])
    return code, capsys.readouterr().err



def interrupted_after_one_result():
    """A stand-in for cli.record_for that writes one result, then raises the Interrupted a SIGINT raises."""
    real_record_for, written = cli.record_for, []

    def record_for(*args, **kwargs):
        if written:
            raise cli.Interrupted(signal.SIGINT)
        written.append(True)
        return real_record_for(*args, **kwargs)

    return record_for

def test_an_interrupt_counts_failed_lines_apart_from_answered_ones(tmp_path, capsys, monkeypatch, tiny_model_factory):
    """'interrupted (SIGINT): 3 of 5 lines done' counted the 2 lines recorded as errors as done, though only 1
    had a result: the message and --stats now say lines with results, lines failed and lines left."""
    model = tiny_model_factory("llama")
    src, out, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    src.write_text("".join(json.dumps({"id": k, "prompt": "Hi"}) + "\n" for k in "abc")
                   + '{"id": "broken", \n' + json.dumps({"id": "a", "prompt": "duplicate id"}) + "\n")
    real_record_for = cli.record_for
    monkeypatch.setattr(cli, "record_for", interrupted_after_one_result())
    code, err = run(capsys, src, "-o", out, "--model", model, "--max-tokens", "2", "--stats", stats)
    assert code == 130, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert (sum(r.get("error") is None for r in records), sum(r.get("error") is not None for r in records)) == (1, 2)
    assert ("batchllm: interrupted (SIGINT): 1 of 5 lines have results, 2 failed (recorded with an error), "
            "2 left; run the same command to resume") in err, err
    assert json.loads(stats.read_text()) == {
        "interrupted": "SIGINT", "num_lines": 5, "num_lines_recorded": 3, "num_lines_resumed": 0,
        "num_lines_done": 1, "num_lines_failed": 2, "num_lines_left": 2}

    monkeypatch.setattr(cli, "record_for", real_record_for)  # the same command completes the job
    code, err = run(capsys, src, "-o", out, "--model", model, "--max-tokens", "2", "--stats", stats)
    assert code == 1 and "5 lines: 3 done, 2 failed (2 run now)" in err, err


def test_a_dead_worker_says_how_many_lines_failed_and_are_left(tmp_path, capsys, monkeypatch, tiny_model_factory):
    """A data-parallel worker that died mid-job: '(2 of 3 lines done)' counted a failed line as done."""
    from batchllm.parallel.data_parallel import WorkerDied

    def worker_died(writers, llm, valid, args, num_failed):
        raise WorkerDied("data-parallel worker 1 killed by SIGKILL")

    monkeypatch.setattr(cli, "_generate_into", worker_died)
    src, out, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    src.write_text('{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Hi"}\n{"id": "c", "prompt": ""}\n')
    code, err = run(capsys, src, "-o", out, "--model", tiny_model_factory("llama"), "--stats", stats)
    assert code == 2, err
    assert ("batchllm: error: data-parallel worker 1 killed by SIGKILL (0 of 3 lines have results, 1 failed "
            "(recorded with an error), 2 left; run the same command to resume)") in err, err
    assert json.loads(stats.read_text()) == {
        "failed": "data-parallel worker 1 killed by SIGKILL", "num_lines": 3, "num_lines_recorded": 1,
        "num_lines_resumed": 0, "num_lines_done": 0, "num_lines_failed": 1, "num_lines_left": 2}


def _read_only(monkeypatch, place):
    """Opening a file under `place` to write fails as on a read-only mount (the tests may run as root, whom
    chmod does not stop); `io.job` opens every file of the job."""
    import errno

    from batchllm.io import job

    def read_only_open(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and place in Path(path).resolve().parents:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(job, "open", read_only_open, raising=False)  # the module's global wins over the builtin


def test_a_complete_job_on_a_read_only_place_reports_itself_complete(tmp_path, capsys, monkeypatch,
                                                                     tiny_model_factory):
    """Running a finished job again where its output can no longer be written (a read-only mount, an archive)
    failed with 'cannot write the output ...: Read-only file system': the lock opened the output to append
    before the job was found complete. It needs no write access: reported complete, nothing written."""
    model = tiny_model_factory("llama")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Hi", "temperature": -1}\n'
                   + json.dumps({"custom_id": "o", "method": "POST", "url": "/v1/completions",
                                 "body": {"prompt": "Hi", "temperature": -1}}) + "\n")
    options = ["--model", model, "--max-tokens", "2"]
    code, err = run(capsys, src, "-o", out, *options)
    assert code == 1 and (tmp_path / "out.errors.jsonl").is_file(), err
    files = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    _read_only(monkeypatch, tmp_path)
    code, err = run(capsys, src, "-o", out, *options)
    assert code == 1 and "already complete (3 lines: 1 done, 2 failed); nothing to run" in err, err
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files, "nothing was written"

    monkeypatch.undo()  # a job with a line left does need to write: refused by name, before the model is built
    out.write_text("".join(line for line in out.read_text().splitlines(keepends=True) if '"a"' not in line))
    _read_only(monkeypatch, tmp_path)
    code, err = run(capsys, src, "-o", out, *options)
    assert code == 2 and err.endswith(f"batchllm: error: cannot write the output {str(out)!r}: "
                                      "Read-only file system\n"), err
    code, err = run(capsys, src, "-o", out, *options, "--overwrite")  # (it was refused as the errors file)
    assert code == 2 and err.endswith(f"batchllm: error: cannot write the output {str(out)!r}: "
                                      "Read-only file system\n"), err


def test_ray_options_without_ray_are_refused_by_name(tmp_path, capsys):
    """--num-replicas 4 without --ray ran one engine, silently: each Ray option is refused as argparse refuses
    an option, naming it and saying that it needs --ray (given its default value too)."""
    import pytest

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi"}\n')
    for given in (["--num-replicas", "4"], ["--ray-batch-size", "1024"], ["--ray-address", "auto"],
                  ["--num-replicas=1", "--ray-address", "auto"]):
        with pytest.raises(SystemExit) as stopped:
            cli.main(["run", str(src), "-o", str(tmp_path / "out.jsonl"), *given])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.startswith("usage: batchllm run"), err
        flags = [word.split("=")[0] for word in given if word.startswith("--")]
        assert err.endswith(f"batchllm run: error: {' and '.join(flags)} only appl{'y' if len(flags) > 1 else 'ies'} "
                            "with --ray (a Ray Data job); add --ray, or leave "
                            f"{'them' if len(flags) > 1 else 'it'} out\n"), err
        assert not (tmp_path / "out.jsonl").exists()


def test_a_ray_directory_no_job_wrote_is_refused_without_suggesting_what_ray_refuses(tmp_path, capsys):
    """`run --ray -o DIR` into a directory holding files but no job.batchllm-state said '... or pass --overwrite',
    and `--overwrite` was then refused (it never deletes a directory no --ray job wrote). Its message names what
    does work; neither run touches the files."""
    import pytest

    pytest.importorskip("ray")
    src, data = tmp_path / "in.jsonl", tmp_path / "data"
    src.write_text('{"id": "a", "prompt": "Hi"}\n')
    data.mkdir()
    (data / "precious.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        code, err = run(capsys, src, "-o", data, "--ray", *extra)
        assert code == 2 and "--overwrite" not in err.replace("refusing --overwrite", ""), err
        assert (f"{str(data)!r}: it holds files but no job.batchllm-state, so no batchllm --ray job wrote it; "
                "give a new or empty directory as -o, or remove these files") in err, err
    assert sorted(p.name for p in data.iterdir()) == ["precious.txt"]


def ray_shard(output_dir: Path, base: str, records: list[dict], committed: bool = True) -> None:
    """A shard of `records` as Ray Data (2.60+) leaves it: its checkpoint entry written first as
    `_checkpoint/<base>.pending.parquet` and, once the shard is written, renamed `<base>.parquet` (`committed`; not
    where its worker died in between)."""
    (output_dir / "_checkpoint").mkdir(parents=True, exist_ok=True)
    entry = output_dir / "_checkpoint" / f"{base}.pending.parquet"
    entry.write_bytes(b"PAR1")
    (output_dir / f"{base}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if committed:
        entry.rename(entry.with_name(f"{base}.parquet"))


def _ray_job_faked(monkeypatch, records: list[dict]):
    """`run --ray` with Ray taken as started and its Ray Data job replaced by one writing `records` as a shard;
    returns the list of the job's calls."""
    import ray

    from batchllm.ray import jsonl_job

    calls = []

    def fake_job(input_path, output_dir, *args, **kwargs):
        calls.append(output_dir)
        ray_shard(output_dir, "shard_000000", records)
        return {"num_records": len(records), "num_errors": sum(bool(r["error"]) for r in records), "wall_s": 0.0}

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(jsonl_job, "run_jsonl_on_ray", fake_job)
    return calls


def test_a_ray_job_with_lines_left_in_a_read_only_directory_is_refused_before_it_runs(tmp_path, capsys, monkeypatch):
    """`run --ray` into a read-only directory holding some results failed as an 'unexpected failure' (exit 3) when
    Ray could not write its checkpoint, after the engine had run the lines left (their answers lost): the
    directory was checked only where it held no results. Now refused by name before anything runs, as without
    --ray; a finished job there is reported complete (no write needed)."""
    import pytest

    pytest.importorskip("ray")
    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    src.write_text('{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Hi"}\n')
    calls = _ray_job_faked(monkeypatch, [{"id": "a", "error": None}])
    code, err = run(capsys, src, "-o", out, "--ray")
    assert code == 0 and len(calls) == 1, err
    _read_only(monkeypatch, tmp_path)
    code, err = run(capsys, src, "-o", out, "--ray")
    assert code == 2 and len(calls) == 1, err
    assert err.endswith(f"batchllm: error: cannot write the --ray output directory {str(out)!r}: "
                        "Read-only file system\n"), err

    (out / "shard_000000.jsonl").write_text('{"id": "a", "error": null}\n{"id": "b", "error": null}\n')
    code, err = run(capsys, src, "-o", out, "--ray")
    assert code == 0 and len(calls) == 1 and "is already complete (2 lines: 2 done, 0 failed)" in err, err


def test_a_finished_job_of_an_empty_input_is_complete_in_a_read_only_place(tmp_path, capsys, monkeypatch):
    """An empty input's job, run again where its (empty) output can no longer be written, was refused ('cannot
    write the output'): a 0-byte output was taken for a fresh start and its files checked for writing before the
    empty input was seen. It is the finished job: exit 0, nothing written, no model loaded."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n")
    code, err = run(capsys, src, "-o", out)
    assert code == 0 and out.read_bytes() == b"", err
    files = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    _read_only(monkeypatch, tmp_path)
    code, err = run(capsys, src, "-o", out)
    assert code == 0 and "has no requests" in err, err
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files, "nothing was written"


def test_ray_stats_onto_the_jobs_own_files_is_refused(tmp_path, capsys, monkeypatch):
    """`run --ray --stats OUT/job.batchllm-state` was checked against the input only: the statistics replaced the
    job's state file at the end (the next run refused the directory as damaged). --stats is checked as without
    --ray: none of the job's files, nor a file among its shards."""
    import pytest

    pytest.importorskip("ray")
    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    src.write_text('{"id": "a", "prompt": "Hi"}\n')
    calls = _ray_job_faked(monkeypatch, [{"id": "a", "error": None}])
    for stats, said in ((out / "job.batchllm-state", "is the output's state file"), (out, "is the output directory"),
                        (out / "s.jsonl", "is inside the --ray output directory")):
        code, err = run(capsys, src, "-o", out, "--ray", "--stats", stats)
        assert code == 2 and said in err and not calls, err


def test_a_signal_after_every_ray_shard_is_written_does_not_interrupt_the_finished_job(tmp_path, capsys,
                                                                                        monkeypatch):
    """`run --ray` reported a finished job as interrupted (exit 130) when SIGINT arrived after every shard was
    written (while they were counted, or Ray shut down): as without --ray, the job says when its results are
    written, and a signal after that is ignored."""
    import os
    import signal

    import pytest
    import ray

    from batchllm.ray import jsonl_job

    pytest.importorskip("ray")

    def finished_then_signalled(input_path, output_dir, *args, on_written=None, **kwargs):
        (output_dir / "part-0.jsonl").write_text(json.dumps({"id": "a", "error": None}) + "\n")
        if on_written is not None:
            on_written()
        os.kill(os.getpid(), signal.SIGINT)
        return {"num_records": 1, "num_errors": 0, "wall_s": 0.0}

    monkeypatch.setattr(jsonl_job, "run_jsonl_on_ray", finished_then_signalled)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi"}\n')
    code, err = run(capsys, src, "-o", tmp_path / "out", "--ray")
    assert code == 0 and "1 records in" in err and "interrupted" not in err, err


LINE_KEYS = {"num_lines", "num_lines_recorded", "num_lines_done", "num_lines_failed", "num_lines_left"}


def test_every_stats_file_holds_the_same_line_counts(tmp_path, capsys, monkeypatch, tiny_model_factory):
    """--stats of a finished run, or of one with nothing to run, lacked num_lines, num_lines_recorded and
    num_lines_left (a stopped run's had them), and a finished --ray run wrote only num_records/num_errors: a script
    reading one key broke on the others. Every run now writes the same line counts, with their true values."""
    import pytest

    src, out, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    src.write_text('{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Hi", "temperature": -1}\n')
    counts = {"num_lines": 2, "num_lines_recorded": 2, "num_lines_done": 1, "num_lines_failed": 1,
              "num_lines_left": 0}
    for _ in ("finished", "nothing to run"):
        code, err = run(capsys, src, "-o", out, "--model", tiny_model_factory("llama"), "--max-tokens", "2",
                        "--stats", stats)
        assert code == 1, err
        written = json.loads(stats.read_text())
        assert {k: written[k] for k in LINE_KEYS} == counts, written
    src.write_text("")
    code, err = run(capsys, src, "-o", tmp_path / "empty.jsonl", "--stats", stats)
    assert code == 0 and {k: json.loads(stats.read_text())[k] for k in LINE_KEYS} == dict.fromkeys(LINE_KEYS, 0)

    pytest.importorskip("ray")
    src.write_text('{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Hi"}\n')
    _ray_job_faked(monkeypatch, [{"id": "a", "error": None}, {"id": "b", "error": {"message": "m"}}])
    for _ in ("finished", "nothing to run"):
        code, err = run(capsys, src, "-o", tmp_path / "shards", "--ray", "--stats", stats)
        written = json.loads(stats.read_text())
        assert {k: written[k] for k in LINE_KEYS} == counts and written["num_records"] == 2, written


def test_the_end_of_run_report_counts_lines_from_the_job_alone(tmp_path, capsys):
    """`_report` wrote num_lines_done / num_lines_failed (and chose the exit status) from the run's own tally (the
    results `_generate_into` counted, the errors `prepare_lines` gave, the resume state's ids) over the ones
    `_Job.progress_stats` had just given from the writers: two sources for one number, which agree only while
    every error record has an "error" and no result has one. The summary line, --stats and the status now read the
    job's counts alone: here a resumed OpenAI job (1 answered and 1 failed before) whose run answers 2 lines and
    records 1 failure in the errors file."""
    from batchllm.io.job import ResultWriter, ResumeState

    out, errors_path, stats = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl", tmp_path / "stats.json"
    resume = ResumeState(done_ids={"a"}, done_error_lines={2}, num_records=2)
    job = cli._Job(out, errors_path, resume, num_lines=5)
    args = cli.build_parser().parse_args(["run", "in.jsonl", "-o", str(out), "--stats", str(stats)])
    with ResultWriter(out) as results, ResultWriter(errors_path, lazy=True) as errors:
        job.writers = (results, errors)
        for rid in ("c", "d"):
            results.write({"id": None, "custom_id": rid, "response": {"status_code": 200}, "error": None})
        errors.write({"id": None, "custom_id": "e", "response": None, "error": {"code": "x", "message": "m"}})
    assert cli._report(args, job, {"prompt_tokens": 10}, 2.0) == cli.EXIT_LINES_FAILED
    err = capsys.readouterr().err
    assert "batchllm: 5 lines: 3 done, 2 failed (2 run now) in 2.0 s: 1.00 req/s" in err, err
    assert f"failed OpenAI Batch lines are in {errors_path}" in err
    assert {k: v for k, v in json.loads(stats.read_text()).items() if k.startswith("num_")} == {
        "num_lines": 5, "num_lines_recorded": 5, "num_lines_done": 3, "num_lines_failed": 2, "num_lines_left": 0,
        "num_lines_resumed": 2}


def test_a_ray_shard_whose_checkpoint_was_never_committed_is_not_counted(tmp_path, capsys, monkeypatch):
    """`run --ray`'s "already complete" check counted every record in the shards, also those of a shard whose
    worker died after writing it but before Ray committed its checkpoint entry: such a job was reported complete
    (exit 0, nothing run) though a restart would delete that shard and run its lines again. Only committed shards
    are counted now (the complete check, the report, --stats), as a restart reads them."""
    import pytest
    import ray

    from batchllm.ray import jsonl_job

    pytest.importorskip("ray")
    calls = []

    def died_before_committing_one_shard(input_path, output_dir, *args, **kwargs):
        calls.append(output_dir)
        if len(calls) == 1:  # the worker writing b's shard dies before its checkpoint entry is committed
            ray_shard(output_dir, "w1_000000", [{"id": "a", "error": None}])
            ray_shard(output_dir, "w1_000001", [{"id": "b", "error": None}], committed=False)
            raise OSError(5, "Input/output error")
        for pending in (output_dir / "_checkpoint").glob("*.pending.parquet"):  # as Ray restarts: b runs again
            (output_dir / pending.name.replace(".pending.parquet", ".jsonl")).unlink()
            pending.unlink()
        ray_shard(output_dir, "w2_000000", [{"id": "b", "error": None}])
        return {"num_records": 2, "num_errors": 0, "wall_s": 0.0}

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(jsonl_job, "run_jsonl_on_ray", died_before_committing_one_shard)
    src, out, stats = tmp_path / "in.jsonl", tmp_path / "shards", tmp_path / "stats.json"
    src.write_text('{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Hi"}\n')
    code, err = run(capsys, src, "-o", out, "--ray")
    assert code == 2 and len(calls) == 1, err
    assert jsonl_job.count_shard_records(out)[:2] == (1, 0), "b's shard is not committed"
    code, err = run(capsys, src, "-o", out, "--ray", "--stats", stats)
    assert code == 0 and len(calls) == 2 and "already complete" not in err, err
    assert json.loads(stats.read_text())["num_lines_done"] == 2
    code, err = run(capsys, src, "-o", out, "--ray")
    assert code == 0 and len(calls) == 2 and "is already complete (2 lines: 2 done, 0 failed)" in err, err
    from ray.data.checkpoint.checkpoint_writer import PENDING_CHECKPOINT_SUFFIX

    assert jsonl_job.PENDING_CHECKPOINT == PENDING_CHECKPOINT_SUFFIX + ".parquet", "Ray's name of an uncommitted entry"


SECOND_SIGNAL_JOB = """
import os, signal, sys, time
from batchllm import cli

def slow_to_stop(writers, llm, valid, args, num_failed):
    out = writers[0]  # (the output's writer, the errors file's, the format)
    for item in valid[:2]:
        out.write({"id": item.line.request_id, "text": "x", "error": None})
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first signal: the job starts to stop
        time.sleep(60)
    finally:  # a stop that takes long (aborting the engine's requests), the output still open
        os.kill(os.getpid(), signal.SIGTERM)  # the second signal
        time.sleep(60)

cli._generate_into = slow_to_stop
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_second_signal_while_the_job_stops_exits_at_once_and_the_job_resumes(tmp_path, tiny_model_factory):
    """A second SIGINT/SIGTERM while `run` stopped after the first was ignored: a stop that hung (a slow abort, a
    stuck shutdown) could not be cut short by a second Ctrl-C or Slurm's/Kubernetes' second TERM. It now ends the
    process at once with 128 + that signal, the records written so far flushed: the same command resumes them."""
    import os
    import subprocess
    import sys

    model = tiny_model_factory("llama")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": k, "prompt": "Hi"}) + "\n" for k in "abcd"))
    argv = ["run", str(src), "-o", str(out), "--model", model, "--max-tokens", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    try:
        done = subprocess.run([sys.executable, "-c", SECOND_SIGNAL_JOB, *argv], env=env, capture_output=True,
                              text=True, timeout=50)
    except subprocess.TimeoutExpired:
        raise AssertionError("the second signal did not end the job") from None
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "SIGTERM again: exiting now; the results written so far are kept" in done.stderr, done.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]

    code = cli.main(argv)  # the same command resumes: the two lines left run, the two written are kept
    assert code == 0
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == ["a", "b", "c", "d"]


def test_ray_overwrite_keeps_the_earlier_results_until_a_replica_has_loaded_the_model(tmp_path, capsys, monkeypatch,
                                                                                     tiny_model_factory):
    """`run --ray --overwrite` deleted the earlier shards and checkpoint before any replica had loaded the model:
    a model that could not load (bad weights, OOM) lost them. As `run` without --ray, nothing is deleted until a
    replica has built its engine (`EngineReplica` calls `on_loaded`): the earlier results are set aside (so that Ray's
    checkpoint runs every line again), deleted once the model has loaded, and put back if it never does."""
    import shutil

    import pytest
    import ray

    from batchllm.ray import jsonl_job
    from batchllm.ray.stages import EngineReplica

    pytest.importorskip("ray")
    good = tiny_model_factory("llama")
    bad = tmp_path / "bad-model"
    shutil.copytree(good, bad)
    for weights in bad.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")  # (its config.json is fine: the driver's checks pass)
    runs = []

    def a_replica_then_its_shard(input_path, output_dir, config, *args, on_loaded=None, **kwargs):
        assert not list(output_dir.glob("*.jsonl")) and not list(output_dir.glob("_checkpoint/*")), "every line runs"
        EngineReplica(config, **({} if on_loaded is None else {"on_loaded": on_loaded}))  # as a Ray actor builds it
        runs.append(config.model)
        ray_shard(output_dir, f"run{len(runs)}_000000", [{"id": k, "text": config.model, "error": None} for k in "ab"])
        return {"num_records": 2, "num_errors": 0, "wall_s": 0.0}

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(jsonl_job, "run_jsonl_on_ray", a_replica_then_its_shard)
    src, out = tmp_path / "in.jsonl", tmp_path / "shards"
    src.write_text('{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Hi"}\n')
    options = ["--ray", "--device", "cpu", "--max-tokens", "2"]
    code, err = run(capsys, src, "-o", out, "--model", good, *options)
    assert code == 0, err
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    code, err = run(capsys, src, "-o", out, "--model", bad, *options, "--overwrite")
    assert code != 0 and "cannot read weights" in err, err
    assert f"no replica loaded the model: the earlier results in {out} are kept as they were" in err, err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    code, err = run(capsys, src, "-o", out, "--model", good, *options)  # the earlier job, complete
    assert code == 0 and "is already complete (2 lines: 2 done, 0 failed)" in err, err

    code, err = run(capsys, src, "-o", out, "--model", good, *options, "--overwrite")  # the model loads: start over
    assert code == 0 and len(runs) == 2, err
    assert sorted(p.name for p in out.iterdir()) == ["_checkpoint", "job.batchllm-state", "run2_000000.jsonl"]


def test_a_stopped_overwrite_says_what_to_run_and_what_the_output_holds(tmp_path, capsys, monkeypatch,
                                                                        tiny_model_factory):
    """A stopped --overwrite run said "run the same command to resume", but that command (with --overwrite) threw
    the results written away and computed them again; stopped while the model loaded, it counted 0 lines with
    results while the output still held the earlier ones."""
    model = tiny_model_factory("llama")
    src, out, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    src.write_text("".join(json.dumps({"id": k, "prompt": "Hi"}) + "\n" for k in "abc"))
    command = [src, "-o", out, "--model", model, "--max-tokens", "2", "--stats", stats]
    assert run(capsys, *command)[0] == 0
    earlier = out.read_text()

    def interrupted_while_loading(*args):
        raise cli.Interrupted(signal.SIGINT)

    with monkeypatch.context() as patched:
        patched.setattr(cli, "_build_while_reading", interrupted_while_loading)
        code, err = run(capsys, *command, "--overwrite")
    assert code == 130 and out.read_text() == earlier
    assert (f"batchllm: interrupted (SIGINT): {out} was not started over (the model had not loaded) and holds its "
            "earlier results: 3 of 3 lines have results, 0 failed (recorded with an error), 0 left; run the same "
            "command to start over, or it without --overwrite to resume") in err, err
    assert json.loads(stats.read_text())["num_lines_done"] == 3

    with monkeypatch.context() as patched:
        patched.setattr(cli, "record_for", interrupted_after_one_result())
        code, err = run(capsys, *command, "--overwrite")
    assert code == 130 and len(out.read_text().splitlines()) == 1
    assert ("1 of 3 lines have results, 0 failed (recorded with an error), 2 left; run the same command without "
            "--overwrite to resume") in err, err
    kept = out.read_text()
    code, err = run(capsys, *command)  # without --overwrite: the line written is kept, the two left run
    assert code == 0 and "resuming" in err and out.read_text().startswith(kept), err
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == ["a", "b", "c"]


def test_a_second_signal_says_what_to_run(monkeypatch):
    """The line a second signal prints said "run the same command to resume" under --overwrite too."""
    said = []
    monkeypatch.setattr(cli, "_exit_now", lambda signum, hint: said.append((signum, hint)))
    with cli._signals_interrupt(lambda: "run the same command without --overwrite to resume"):
        try:
            signal.raise_signal(signal.SIGINT)
        except cli.Interrupted:
            pass
        signal.raise_signal(signal.SIGINT)
    assert said == [(signal.SIGINT, "run the same command without --overwrite to resume")]


def test_a_failed_write_under_overwrite_says_to_resume_without_it(tmp_path, capsys, monkeypatch, tiny_model_factory):
    """A write that failed under --overwrite (a full disk) left what was written, but rerunning that command would
    compute it again: the error line now says to resume without --overwrite."""
    import errno
    import os

    from batchllm.io import job

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": k, "prompt": "Hi"}) + "\n" for k in "abc"))
    real_write = job.ResultWriter.write

    def full_after_one(self, record):
        if self.path == out and self.num_written:
            raise job.OutputWriteError(self.path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        real_write(self, record)

    monkeypatch.setattr(job.ResultWriter, "write", full_after_one)
    code, err = run(capsys, src, "-o", out, "--model", tiny_model_factory("llama"), "--max-tokens", "2", "--overwrite")
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"batchllm: error: cannot write results to {out}: No space left on device; run the same command without "
        "--overwrite to resume (with --overwrite, the lines written so far would be computed again)"), err


@pytest.mark.parametrize("model, served, expected", [
    (None, None, "no --model given: the default model (SmolLM2) answers the lines naming 'gpt-4o-mini' (2 lines)"),
    # with --model, a response echoing 'gpt-4o-mini' names a model that did not answer: said too (it was silent)
    ("/models/SmolLM2", None, "SmolLM2 answers the lines naming 'gpt-4o-mini' (2 lines), and their responses' "
                              "\"model\" echoes those names; --served-model-name NAME puts NAME there instead"),
    ("/models/SmolLM2", ["smol"], None),  # renamed: the responses name "smol"
])
def test_lines_naming_another_model_are_noted(capsys, model, served, expected):
    """Lines naming the model by --model as given, its directory's name or a served name are its own; others are
    noted once, counted, before generating."""
    from types import SimpleNamespace

    args = SimpleNamespace(model=model, served_model_name=served)
    names = ["gpt-4o-mini", "SmolLM2", None, "gpt-4o-mini", model, "smol" if served else None]
    valid = [SimpleNamespace(line=SimpleNamespace(model=name)) for name in names]
    cli.note_models_named_without_model(args, valid, "SmolLM2")
    err = capsys.readouterr().err
    if expected is None:
        assert err == ""
    else:
        assert expected in err and err.count("note:") == 1, err


def test_stats_output_rate_is_over_the_runs_own_wall_time(tmp_path, capsys, tiny_model_factory):
    """--stats wrote the engine's output_tokens_per_s (over its generation alone) beside the run's wall_s (which
    counts the input's reading too): at 100k lines 1,438.6 tok/s against 100,000 tokens in 133.2 s, and the
    summary line's 751. All three now tell the same rate."""
    model = tiny_model_factory("llama")
    src, out, stats_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    src.write_text("".join(json.dumps({"id": f"q{k}", "prompt_token_ids": [5, 6, k], "max_tokens": 3, "temperature": 0,
                                       "ignore_eos": True}) + "\n" for k in range(7, 11)))
    code, err = run(capsys, src, "-o", out, "--model", model, "--device", "cpu", "--stats", stats_path)
    assert code == 0, err
    stats = json.loads(stats_path.read_text())
    assert stats["output_tokens"] == 12 and stats["wall_s"] > 0
    assert stats["output_tokens_per_s"] == pytest.approx(12 / stats["wall_s"], rel=1e-9)
    assert f"{12 / stats['wall_s']:.0f} output tok/s" in err


def test_the_summary_keeps_what_preemption_computed_again_out_of_the_sharing_saving(tmp_path, capsys,
                                                                                     tiny_model_factory):
    """4 prompts without a shared prefix over a pool too small for their outputs: preemption computes prompts and
    outputs again, which the summary counted against sharing ("prefix sharing saved -41.9% of prefill"). The
    saving is now the plan's (none here) and the summary names the tokens computed again."""
    model = tiny_model_factory("llama")
    src, out, stats_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    src.write_text("".join(json.dumps({"id": f"q{k}", "prompt_token_ids": [k * 7 % 97 + 3 for k in range(k, k + 20)],
                                       "max_tokens": 40, "temperature": 0, "ignore_eos": True}) + "\n"
                           for k in range(4)))
    code, err = run(capsys, src, "-o", out, "--model", model, "--device", "cpu", "--stats", stats_path,
                    "--block-size", "8", "--num-kv-blocks", "14", "--kv-admission-threshold", "4.0")
    assert code == 0, err
    stats = json.loads(stats_path.read_text())
    assert stats["num_preemptions"] > 0 and stats["recomputed_tokens"] > 0
    assert stats["prefill_tokens_computed"] > stats["completion_prompt_tokens"]
    assert 0 <= stats["saving_ratio"] < 0.1
    assert f"prefix sharing saved {100 * stats['saving_ratio']:.1f}% of prefill ({stats['recomputed_tokens']} tokens " \
           "computed again after preemption)" in err


@pytest.mark.parametrize("option", ["--served-model-name", "--response-role", "--stop"])
def test_a_text_option_that_is_not_utf8_is_refused_by_name(tmp_path, capsys, option):
    """A non-UTF-8 argument (Python gives its bytes as lone surrogates) was written into the output as "\\udcff",
    which strict JSON readers refuse; a stop string of it could never match."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi"}\n')
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", str(src), "-o", str(tmp_path / "out.jsonl"), option, "\udcffx"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and f"argument {option}: not UTF-8 text: b'\\xffx'" in err, err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_model_path_that_is_not_utf8_is_named_in_utf8():
    from types import SimpleNamespace

    args = SimpleNamespace(model="/models/m\udcff", served_model_name=None, response_role="assistant",
                           default_chat_template_kwargs=None, exclude_tools_when_tool_choice_none=False,
                           tool_call_parser=None, enable_auto_tool_choice=False, reasoning_parser=None,
                           return_tokens_as_token_ids=False)
    shape = cli.response_shape(args, "SmolLM2")
    assert shape.model == "/models/m\ufffd"


def test_ctrl_c_before_the_command_takes_over_is_one_line(monkeypatch, capsys):
    """Ctrl-C in a run's first half second (Python loading the command, or reading its options) printed a
    KeyboardInterrupt traceback where later it prints one line and exits 130: the `batchllm` command (pyproject's
    script) and `python -m batchllm` answer it as later."""
    from batchllm.__main__ import launch

    def interrupted(argv=None):
        raise KeyboardInterrupt

    from batchllm.entrypoints.openai import run_batch

    monkeypatch.setattr(cli, "main", interrupted)
    assert launch() == 130
    assert capsys.readouterr().err == "batchllm: interrupted\n"
    assert run_batch.main(["-i", "in.jsonl", "-o", "out.jsonl"]) == 130  # (vLLM's module path: the same)
    assert capsys.readouterr().err == "batchllm: interrupted\n"
    scripts = (Path(__file__).parents[2] / "pyproject.toml").read_text().partition("[project.scripts]")[2]
    assert scripts.split("\n")[1] == 'batchllm = "batchllm.__main__:launch"'  # (tomllib: Python 3.11)
