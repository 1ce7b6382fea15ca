"""BatchLLM on Ray Data (local Ray, 2 CPUs, one session for the module): the processor and the
`batchllm run --ray` path give the single-machine CLI's greedy outputs, keep prefix groups on one
replica, and turn bad rows into errors. Skipped when the `ray` extra is not installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("ray.data")
pytestmark = pytest.mark.slow

SYSTEMS = [f"You are assistant {k} of the {name} team. Answer in one short sentence, politely."
           for k, name in enumerate(["red", "blue", "green", "gold", "grey", "pink", "teal", "navy"])]
ROWS = [{"id": f"r{i}", "system": SYSTEMS[i % len(SYSTEMS)], "question": f"What is {i} plus {i % 7}?"}
        for i in range(160)]
LONG = {"id": "too-long", "system": SYSTEMS[0], "question": "word " * 3000}
OPTIONS = ["--temperature", "0", "--max-tokens", "4", "--dtype", "float32", "--device", "cpu",
           "--max-model-len", "2048", "--no-progress"]


def _messages(row: dict) -> list[dict]:
    return [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["question"].strip()}]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # shared CI/dev boxes: no OOM killer on workers
    ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, default_model_dir):
    """One input file (plain chat lines, OpenAI lines, bad lines) and its single-machine CLI output."""
    from batchllm.cli import main

    root = tmp_path_factory.mktemp("ray-jobs")
    lines = [json.dumps({"id": r["id"], "messages": _messages(r)}) for r in [*ROWS, LONG]]
    lines[0] = json.dumps({**json.loads(lines[0]), "source_row": 17})  # a table's other column: ignored, named
    lines += [
        json.dumps({"custom_id": "oa-chat", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                             "max_tokens": 3}}),  # (OpenAI's content parts beside other lines' strings)
        json.dumps({"custom_id": "oa-text", "method": "POST", "url": "/v1/completions",
                    "body": {"prompt": "The sky is", "max_tokens": 3}}),
        json.dumps({"custom_id": "oa-echo", "method": "POST", "url": "/v1/completions",  # (the replica's tokenizer
                    "body": {"prompt": "The sky is", "max_tokens": 2, "echo": True, "logprobs": 1}}),  # names "The")
        '{"id": "broken", ', json.dumps({"id": "r1", "prompt": "duplicate id"}),
        json.dumps({"id": "bad-temp", "prompt": "x", "temperature": -1}),
    ]
    src = root / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = root / "single.jsonl"
    assert main(["run", str(src), "-o", str(out), *OPTIONS]) == 1  # some lines fail on purpose
    return src, [json.loads(x) for x in out.read_text().splitlines()]


def test_processor_matches_the_cli_keeps_prefix_groups_on_one_replica_and_reports(ray_session, jobs):
    from batchllm.ray import ProcessorConfig, build_processor, replica_report

    _, single = jobs
    expected = {r["id"]: r for r in single if "text" in r}
    config = ProcessorConfig(dtype="float32", device="cpu", max_model_len=2048, max_tokens=4,
                             sampling_params={"temperature": 0}, num_replicas=2, batch_size=40)
    processor = build_processor(config, preprocess=lambda row: {"messages": _messages(row)},
                                postprocess=lambda row: {**row, "answer_chars": len(row["generated_text"] or "")})
    items = [*ROWS, LONG, {"id": "no-question", "system": SYSTEMS[1], "question": None}]
    out = {r["id"]: r for r in processor(ray_session.data.from_items(items)).take_all()}

    assert set(out) == {r["id"] for r in items}
    assert "max_model_len" in out["too-long"]["error"] and out["too-long"]["generated_text"] is None
    assert "strip" in out["no-question"]["error"]  # the preprocess raised on this row only
    for row in ROWS:
        got, want = out[row["id"]], expected[row["id"]]
        assert got["error"] is None and got["system"] == row["system"]  # the input's columns travel on
        assert (got["generated_token_ids"], got["generated_text"]) == (want["token_ids"], want["text"]), row["id"]
        assert (got["finish_reason"], got["num_input_tokens"]) == (want["finish_reason"], want["prompt_tokens"])
        assert got["num_generated_tokens"] == len(got["generated_token_ids"])
        assert got["answer_chars"] == len(got["generated_text"])
    for system in SYSTEMS:
        members = [out[r["id"]] for r in ROWS if r["system"] == system]
        assert len({m["batchllm_prefix_key"] for m in members}) == 1
        assert len({m["batchllm_call"] for m in members}) == 1  # one engine call, hence one replica
    assert len({out[r["id"]]["batchllm_prefix_key"] for r in ROWS}) == len(SYSTEMS)

    report = replica_report(out.values())
    assert report["num_rows"] == len(ROWS)
    assert report["prompt_tokens"] == sum(out[r["id"]]["num_input_tokens"] for r in ROWS)
    assert sum(r["num_rows"] for r in report["replicas"].values()) == len(ROWS)
    assert report["saving_ratio"] > 0.3  # the system prompts are computed once per call


def test_an_empty_dataset_comes_back_empty(ray_session):
    """A pipeline whose filter leaves no rows failed inside Ray's shuffle ("Invalid sort key column: No match
    for FieldRef.Name(_batchllm_bucket)"): no batch function had seen a block to give it the column."""
    from batchllm.ray import ProcessorConfig, build_processor

    processor = build_processor(ProcessorConfig(device="cpu", max_tokens=2))
    empty = ray_session.data.from_items([{"prompt": "Hi"}]).filter(lambda row: False)
    assert processor(empty).take_all() == []
    assert processor(ray_session.data.from_items([{"prompt": "Hi"}]), num_rows=0).take_all() == [], (
        "rows counted as none by the caller")
    fixed = build_processor(ProcessorConfig(device="cpu", max_tokens=2, num_buckets=2))
    assert fixed(empty, num_rows=0).take_all() == [], "a fixed bucket count, rows given as none"


def _normalized(record: dict) -> str:
    """A record without the fields that are random per run (OpenAI line and response ids, timestamps) or
    depend on which lines ran in one engine call (cached tokens: a prefix is charged to the call's first
    line that reads it, and Ray calls the engine per batch of rows); logprobs to 3 decimals (another batch,
    other last bits)."""
    record = json.loads(json.dumps(record), parse_float=lambda text: round(float(text), 3))
    if "custom_id" in record:
        record.pop("id")
        if record["response"]:
            record["response"].pop("request_id")
            record["response"]["body"].pop("id")
            record["response"]["body"].pop("created")
            usage = record["response"]["body"]["usage"]
            assert 0 <= usage.pop("prompt_tokens_details")["cached_tokens"] < usage["prompt_tokens"]
    elif record.get("error") is None:
        assert 0 <= record.pop("cached_tokens") < record["prompt_tokens"]
    return json.dumps(record, sort_keys=True)


def test_cli_ray_path_writes_the_single_machine_records_and_skips_them_on_restart(ray_session, jobs, tmp_path,
                                                                                   capsys):
    from batchllm.cli import main

    src, single = jobs
    out_dir = tmp_path / "shards"
    args = ["run", str(src), "-o", str(out_dir), "--ray", "--num-replicas", "2", "--ray-batch-size", "40", *OPTIONS]
    assert main(args) == 1
    assert "ignored fields that are not request fields (in the first 1,000 lines): source_row (1 line)" in (
        capsys.readouterr().err), "named as run without --ray names them"

    def records(directory: Path) -> list[str]:
        return sorted(_normalized(json.loads(x)) for f in directory.glob("*.jsonl") for x in f.read_text().splitlines())

    assert records(out_dir) == sorted(map(_normalized, single))
    shards = sorted(out_dir.glob("*.jsonl"))
    assert len(shards) > 1
    assert main(args) == 1  # a restart: every line is checkpointed, nothing is run or written again
    assert sorted(out_dir.glob("*.jsonl")) == shards
    assert records(out_dir) == sorted(map(_normalized, single))
    # a job that died before committing one shard: that shard's lines, and only those, run again
    lost = shards[0]
    lost.unlink()
    (out_dir / "_checkpoint" / (lost.stem + ".parquet")).unlink()
    assert main(args) == 1
    assert len(list(out_dir.glob("*.jsonl"))) == len(shards)
    assert records(out_dir) == sorted(map(_normalized, single))
    # --overwrite starts over (every line runs again, once); --stats writes the job's counts
    stats = tmp_path / "stats.json"
    assert main([*args, "--overwrite", "--stats", str(stats)]) == 1
    assert records(out_dir) == sorted(map(_normalized, single))
    assert json.loads(stats.read_text())["num_records"] == len(single)


def test_an_interrupted_ray_job_reports_what_it_left_and_writes_its_stats(tmp_path, monkeypatch, capsys):
    """As `run` without --ray: Ctrl-C (SIGINT) or SIGTERM ends the job with 128 + the signal, says how many
    records the committed shards hold (a restart skips them) and still writes --stats."""
    import os
    import signal
    import time

    import ray

    from batchllm.cli import main
    from batchllm.ray import jsonl_job

    out_dir = tmp_path / "shards"

    def interrupted_after_one_shard(input_path, output_dir, *args, **kwargs):
        (output_dir / "_checkpoint").mkdir(exist_ok=True)
        (output_dir / "part-0.jsonl").write_text(json.dumps({"id": "a", "text": "x"}) + "\n"
                                                 + json.dumps({"id": "b", "error": {"message": "m"}}) + "\n")
        (output_dir / "_checkpoint" / "part-0.parquet").write_bytes(b"PAR1")  # (committed, as Ray does)
        (output_dir / "_checkpoint" / "part-1.pending.parquet").write_bytes(b"PAR1")
        (output_dir / "part-1.jsonl").write_text('{"id": "c", "text": "y"}\n{"id": "d", "te')  # not committed
        os.kill(os.getpid(), signal.SIGTERM)  # what `kill` sends; the job's handler stops it
        time.sleep(30)
        raise AssertionError("SIGTERM did not stop the job")

    monkeypatch.setattr(jsonl_job, "run_jsonl_on_ray", interrupted_after_one_shard)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    src, stats = tmp_path / "in.jsonl", tmp_path / "stats.json"
    src.write_text("".join(json.dumps({"id": k, "prompt": "Hi"}) + "\n" for k in "abc"))
    assert main(["run", str(src), "-o", str(out_dir), "--ray", "--stats", str(stats), *OPTIONS]) == 128 + 15
    assert ("interrupted (SIGTERM): 1 of 3 lines have results, 1 failed (recorded with an error), 1 left: "
            f"2 records in {out_dir}; run the same command to resume") in capsys.readouterr().err
    assert json.loads(stats.read_text()) == {"interrupted": "SIGTERM", "num_lines": 3, "num_records": 2,
                                             "num_lines_recorded": 2, "num_errors": 1, "num_lines_done": 1,
                                             "num_lines_failed": 1, "num_lines_left": 1, "num_replicas": 1}


def test_overwrite_with_a_model_the_replicas_cannot_load_keeps_the_earlier_shards(ray_session, tmp_path,
                                                                                   tiny_model_factory, capsys):
    """`--overwrite` deleted the earlier shards before the replicas loaded the model; on real Ray actors, a model
    whose weights cannot be read now leaves them as they were, and one that loads starts over."""
    import shutil

    from batchllm.cli import main

    good = tiny_model_factory("llama")
    bad = tmp_path / "bad-model"
    shutil.copytree(good, bad)
    for weights in bad.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    src, out = tmp_path / "in.jsonl", tmp_path / "shards"
    src.write_text("".join(json.dumps({"id": k, "prompt": "Hi"}) + "\n" for k in "ab"))
    args = ["run", str(src), "-o", str(out), "--ray", "--max-tokens", "2", "--device", "cpu", "--no-progress"]
    assert main([*args, "--model", good]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*args, "--model", str(bad), "--overwrite"]) != 0
    assert "the earlier results in" in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main([*args, "--model", good, "--overwrite"]) == 0
    after = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert not any(str(p).startswith(".batchllm-overwritten") for p in after) and after != set(before)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("batchllm: error:")]


def test_a_model_the_replicas_cannot_build_fails_as_run_without_ray_does(ray_session, tmp_path, tiny_model_factory,
                                                                          capsys):
    """A replica whose engine could not be built (here a tensor missing from the weights, which only loading finds)
    ended `run --ray` with status 3 and Ray's ActorDiedError text; it now ends as `run` does: status 2 and the one
    line naming the cause, and the earlier shards of an --overwrite are kept."""
    import shutil

    from safetensors.torch import load_file, save_file

    from batchllm.cli import main

    bad = tmp_path / "bad-model"
    shutil.copytree(tiny_model_factory("llama"), bad)
    for weights in bad.glob("*.safetensors"):
        tensors = load_file(weights)
        del tensors["model.norm.weight"]
        save_file(tensors, weights)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": k, "prompt": "Hi"}) + "\n" for k in "ab"))
    options = ["--model", str(bad), "--max-tokens", "2", "--device", "cpu", "--no-progress"]
    capsys.readouterr()
    assert main(["run", str(src), "-o", str(tmp_path / "out.jsonl"), *options]) == 2
    without_ray = _error_lines(capsys.readouterr().err)
    assert len(without_ray) == 1 and "lacks weights: model.norm.weight" in without_ray[0]
    out = tmp_path / "shards"
    assert main(["run", str(src), "-o", str(out), "--ray", *options]) == 2
    assert _error_lines(capsys.readouterr().err) == without_ray
    shard = out / "0a1b2c3d_000000.jsonl"  # (an earlier job's shard, as Ray names them: --overwrite keeps it)
    shard.write_text('{"id": "a", "text": "kept"}\n')
    assert main(["run", str(src), "-o", str(out), "--ray", "--overwrite", *options]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == without_ray and "the earlier results in" in err
    assert shard.read_text() == '{"id": "a", "text": "kept"}\n'


def test_what_the_driver_can_check_of_the_model_fails_before_ray_starts(tmp_path, tiny_model_factory, monkeypatch,
                                                                        capsys):
    """A model directory the driver reads is checked as `run` checks it (config, weight files, tokenizer files)
    before Ray starts: the same status and line as without --ray, no Ray actor started."""
    import shutil

    import ray

    from batchllm.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_ray)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "Hi"}) + "\n")
    no_weights, no_tokenizer = tmp_path / "no-weights", tmp_path / "no-tokenizer"
    for model, remove in ((no_weights, "*.safetensors"), (no_tokenizer, "tokenizer*")):
        shutil.copytree(tiny_model_factory("llama"), model)
        for path in model.glob(remove):
            path.unlink()
    for model in (no_weights, no_tokenizer):
        options = ["--model", str(model), "--max-tokens", "2", "--device", "cpu", "--no-progress"]
        capsys.readouterr()
        assert main(["run", str(src), "-o", str(tmp_path / "out.jsonl"), *options]) == 2
        without_ray = _error_lines(capsys.readouterr().err)
        assert len(without_ray) == 1, without_ray
        assert main(["run", str(src), "-o", str(tmp_path / f"shards-{model.name}"), "--ray", *options]) == 2
        assert _error_lines(capsys.readouterr().err) == without_ray, model.name


def test_a_model_path_that_does_not_exist_fails_as_run_without_ray_does(ray_session, tmp_path, capsys):
    """A path the driver cannot see may be one the workers' nodes hold; on a Ray cluster of this node alone it is
    checked once Ray runs, before the job: `run`'s status and line (it was status 3, from the tokenize tasks)."""
    from batchllm.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "Hi"}) + "\n")
    options = ["--model", str(tmp_path / "no-such-model"), "--max-tokens", "2", "--device", "cpu", "--no-progress"]
    assert main(["run", str(src), "-o", str(tmp_path / "out.jsonl"), *options]) == 2
    without_ray = _error_lines(capsys.readouterr().err)
    assert len(without_ray) == 1 and "does not exist" in without_ray[0]
    assert main(["run", str(src), "-o", str(tmp_path / "shards"), "--ray", *options]) == 2
    assert _error_lines(capsys.readouterr().err) == without_ray


def test_a_worker_that_cannot_use_the_model_says_why_through_ray_s_text():
    """Ray keeps only the text of an actor's failed creation: `EngineStartError` carries `run`'s line for a model
    that cannot be used (memory refused: "the engine could not start: ..."), survives pickling, and is found in
    that text; a failure of the code passes unchanged (status 3 then, as without --ray)."""
    import pickle

    import torch

    from batchllm.ray.stages import EngineStartError, _engine_start, engine_start_failure

    with pytest.raises(EngineStartError) as raised, _engine_start("a replica"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    copy = pickle.loads(pickle.dumps(raised.value))
    wrapped = RuntimeError(f"The actor died because of an error raised in its creation task, ...\n  File x\n"
                           f"batchllm.ray.stages.EngineStartError: {copy}\n")
    assert engine_start_failure(wrapped) == (
        "the engine could not start: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(KeyError), _engine_start("a replica"):
        raise KeyError("a bug")
    assert engine_start_failure(RuntimeError("The actor died unexpectedly")) is None


def test_a_first_line_of_only_the_bom_gives_the_records_of_run_without_ray(ray_session, tmp_path, capsys):
    """A first line holding only the UTF-8 BOM got an extra 'line 1: malformed JSON' record under --ray (exit 1,
    num_lines_left -1), while `run` counts it blank: both runs now give the same records."""
    from batchllm.cli import main

    src = tmp_path / "bom.jsonl"
    src.write_bytes(b'\xef\xbb\xbf\n' + b"".join(json.dumps({"id": k, "prompt": "Hi"}).encode() + b"\n" for k in "ab"))
    single, shards, stats = tmp_path / "single.jsonl", tmp_path / "shards", tmp_path / "stats.json"
    assert main(["run", str(src), "-o", str(single), *OPTIONS]) == 0
    assert main(["run", str(src), "-o", str(shards), "--ray", "--stats", str(stats), *OPTIONS]) == 0
    on_ray = [json.loads(x) for f in shards.glob("*.jsonl") for x in f.read_text().splitlines()]
    expected = [json.loads(x) for x in single.read_text().splitlines()]
    assert sorted(map(_normalized, on_ray)) == sorted(map(_normalized, expected))
    assert json.loads(stats.read_text())["num_lines_left"] == 0


def test_auto_tool_choice_lines_on_ray_are_read_by_the_jobs_parser_as_without_ray(ray_session, tmp_path,
                                                                                    default_model_dir):
    """`run --ray --enable-auto-tool-choice --tool-call-parser hermes` serves "auto" lines from the job's options
    (its response shape), on both stages, as `run` does: the same records but for the random call ids; without the
    flags those lines fail each alone on both paths."""
    import re

    from batchllm.cli import main

    call = '<tool_call>\n{"name": "paint", "arguments": {"color": "red"}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "paint", "parameters": {
        "type": "object", "properties": {"color": {"type": "string"}}}}}]
    body = {"messages": [{"role": "user", "content": "Paint it."}], "tools": tools, "tool_choice": "auto",
            "structured_outputs": {"choice": ["Painting.\n" + call]}, "max_tokens": 120}  # (short tokens)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"custom_id": "call", "method": "POST", "url": "/v1/chat/completions", "body": body})
                   + "\n" + json.dumps({"id": "plain", **body}) + "\n" + json.dumps({"id": "text", "prompt": "Hi"})
                   + "\n")
    flags = ["--model", str(default_model_dir), "--enable-auto-tool-choice", "--tool-call-parser", "hermes", *OPTIONS]
    single, shards = tmp_path / "single.jsonl", tmp_path / "shards"
    assert main(["run", str(src), "-o", str(single), *flags]) == 0
    assert main(["run", str(src), "-o", str(shards), "--ray", *flags]) == 0

    def records(texts: list[str]) -> list[str]:
        return sorted(re.sub(r"chatcmpl-tool-[0-9a-f]{16}", "ID", _normalized(json.loads(x))) for x in texts)

    on_ray = records([x for f in shards.glob("*.jsonl") for x in f.read_text().splitlines()])
    assert on_ray == records(single.read_text().splitlines())
    assert sum('"finish_reason": "tool_calls"' in r for r in on_ray) == 2  # (the OpenAI line's and the plain one's)
    refused = tmp_path / "refused"
    assert main(["run", str(src), "-o", str(refused), "--ray", "--model", str(default_model_dir), *OPTIONS]) == 1
