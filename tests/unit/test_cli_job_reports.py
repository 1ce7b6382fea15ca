"""What `batchllm run` says about a job it stops, finds complete or refuses, on a tiny model (no Ray needed
except where a test says so)."""

from __future__ import annotations

import json
import signal

from batchllm import cli


def run(capsys, *args):
    code = cli.main(["run", *map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


def test_an_interrupt_counts_failed_lines_apart_from_answered_ones(tmp_path, capsys, monkeypatch, tiny_model_factory):
    """'interrupted (SIGINT): 3 of 5 lines done' counted the 2 lines recorded as errors as done, though only 1
    had a result: the message and --stats now say lines with results, lines failed and lines left."""
    model = tiny_model_factory("llama")
    src, out, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    src.write_text("".join(json.dumps({"id": k, "prompt": "Hi"}) + "\n" for k in "abc")
                   + '{"id": "broken", \n' + json.dumps({"id": "a", "prompt": "duplicate id"}) + "\n")
    real_record_for, written = cli.record_for, []

    def interrupted_after_one_result(*args, **kwargs):
        if written:
            raise cli.Interrupted(signal.SIGINT)
        written.append(True)
        return real_record_for(*args, **kwargs)

    monkeypatch.setattr(cli, "record_for", interrupted_after_one_result)
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

    def worker_died(out, llm, valid, args, num_failed):
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
