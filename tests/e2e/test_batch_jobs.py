"""Batch jobs users can trust: OpenAI Batch files, every bad line answered, crash and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "batchllm.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def openai_line(custom_id, url=CHAT, **body):
    if url == CHAT and "messages" not in body:
        body["messages"] = [{"role": "user", "content": "Say hello."}]
    if url == COMPLETIONS and "prompt" not in body:
        body["prompt"] = "Hello, my name is"
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "smollm2", **body}}


def check_openai_record(rec):
    """The OpenAI Batch output shape, field by field."""
    assert set(rec) == {"id", "custom_id", "response", "error"}
    assert isinstance(rec["id"], str) and rec["id"].startswith("batch_req_")
    if rec["error"] is not None:
        assert rec["response"]["status_code"] == 400 and rec["response"]["body"]["error"] == {
            "message": rec["error"]["message"], "type": "invalid_request_error", "param": None,
            "code": rec["error"]["code"]}
        assert rec["error"]["code"] == ("context_length_exceeded" if "(max_model_len) is" in rec["error"]["message"]
                                        else "invalid_request")
        assert set(rec["error"]) == {"code", "message"}
        assert isinstance(rec["error"]["code"], str) and isinstance(rec["error"]["message"], str)
        return
    response = rec["response"]
    assert set(response) == {"status_code", "request_id", "body"} and response["status_code"] == 200
    assert isinstance(response["request_id"], str)
    body = response["body"]
    assert body["object"] in ("chat.completion", "text_completion")
    assert isinstance(body["id"], str) and isinstance(body["created"], int) and isinstance(body["model"], str)
    # (present, as OpenAI's and vLLM's responses hold it; vLLM's --fingerprint-mode full by default)
    assert re.fullmatch(r"batchllm-[0-9.]+(-tp\d+)?(-dp\d+)?-[0-9a-f]{8}", body["system_fingerprint"])
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]  # (OpenAI's field)
    for i, choice in enumerate(body["choices"]):
        assert choice["index"] == i and choice["finish_reason"] in ("stop", "length")
        if body["object"] == "chat.completion":
            assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
            assert choice["message"]["refusal"] is None
        else:
            assert isinstance(choice["text"], str)
        assert "logprobs" in choice and "stop_reason" in choice


def test_openai_batch_round_trip(tmp_path, default_model_dir):
    lines = [
        openai_line("chat-1", messages=[{"role": "user", "content": "What is the capital of France?"}],
                    temperature=0, max_completion_tokens=20),
        openai_line("chat-2", temperature=0.7, max_tokens=5, logprobs=True, top_logprobs=2, n=2, seed=3),
        openai_line("cmpl-1", url=COMPLETIONS, max_tokens=6, temperature=0, logprobs=2, stop=["\n"]),
        openai_line("cmpl-ids", url=COMPLETIONS, prompt=[504, 3575, 282], max_tokens=3),
    ]
    src = tmp_path / "batch.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    r = cli("run", src, "-o", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert ("no --model given: the default model (SmolLM2-135M-Instruct) answers the lines naming 'smollm2' "
            "(4 lines)") in r.stderr, "a file written for another model is not answered by the default unnoticed"
    records = {rec["custom_id"]: rec for rec in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"chat-1", "chat-2", "cmpl-1", "cmpl-ids"}
    for rec in records.values():
        check_openai_record(rec)
        assert rec["error"] is None
    chat = records["chat-1"]["response"]["body"]
    assert chat["choices"][0]["message"]["content"] == "The capital of France is Paris."
    assert chat["model"] == "smollm2"
    two = records["chat-2"]["response"]["body"]
    assert len(two["choices"]) == 2 and two["usage"]["completion_tokens"] == 10
    # n = 2: the prompt its two answers share is computed for this line; only the chat template's head, which
    # chat-1 (the first line) computed, is read from a shared prefix
    assert 0 < two["usage"]["prompt_tokens_details"]["cached_tokens"] < two["usage"]["prompt_tokens"] - 1
    assert chat["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    content = two["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and all(len(t["top_logprobs"]) == 2 for t in content)
    cmpl = records["cmpl-1"]["response"]["body"]
    assert cmpl["object"] == "text_completion" and "\n" not in cmpl["choices"][0]["text"]
    lp = cmpl["choices"][0]["logprobs"]
    assert (len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
            == cmpl["usage"]["completion_tokens"])
    assert records["cmpl-ids"]["response"]["body"]["usage"]["prompt_tokens"] == 3


def test_reasoning_parser_and_default_template_keywords_shape_the_answers(tmp_path, default_model_dir):
    """vLLM's run-batch --reasoning-parser and --default-chat-template-kwargs (both refused before): an answer
    with no </think> is all thinking under qwen3 (a model whose template opened it), all content with
    enable_thinking off; both are options of the output, so a resume under others is refused. deepseek_r1 needs
    the tokenizer's think tokens, as vLLM's does: SmolLM2 has none, so the answers are read with its tokenizer and
    the two tokens added (qwen3, as vLLM's, splits the text and needs none)."""
    from transformers import AutoTokenizer

    thinking = AutoTokenizer.from_pretrained(default_model_dir)
    thinking.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    thinking.save_pretrained(tmp_path / "tokenizer")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(openai_line("q", messages=[{"role": "user", "content": "What is the capital of "
                                                                                     "France?"}],
                                          temperature=0, max_tokens=6)) + "\n")
    out = tmp_path / "out.jsonl"

    def message(*options):
        r = cli("run", src, "-o", out, "--no-progress", "--tokenizer", tmp_path / "tokenizer", *options)
        assert r.returncode == 0, r.stderr
        return json.loads(out.read_text())["response"]["body"]["choices"][0]["message"]

    r = cli("run", src, "-o", out, "--no-progress", "--reasoning-parser", "deepseek_r1")  # (qwen3 reads text)
    assert r.returncode == 2 and "the tokenizer has no <think> or </think> token" in r.stderr, r.stderr
    assert not out.exists(), "refused before anything is written"
    thought = message("--reasoning-parser", "qwen3")
    assert thought["reasoning"] == "The capital of France is Paris" and thought["content"] is None
    r = cli("run", src, "-o", out, "--no-progress", "--tokenizer", tmp_path / "tokenizer")
    assert r.returncode == 2 and 'reasoning_parser "qwen3" -> (unset)' in r.stderr, r.stderr
    said = message("--overwrite", "--reasoning-parser", "qwen3", "--default-chat-template-kwargs",
                   '{"enable_thinking": false}')
    assert said["content"] == "The capital of France is Paris" and said["reasoning"] is None


def test_one_file_with_every_bad_case(tmp_path, default_model_dir):
    too_long = "word " * 9000
    raw = [
        json.dumps(openai_line("ok-1", temperature=0, max_tokens=3)),                          # 1 ok
        '{"custom_id": "broken", "method": "POST", ',                                           # 2 malformed JSON
        json.dumps({"method": "POST", "url": CHAT, "body": {"messages": []}}),                 # 3 missing id
        json.dumps(openai_line("ok-1", max_tokens=3)),                                          # 4 duplicate id
        json.dumps(openai_line("empty-prompt", url=COMPLETIONS, prompt="")),                  # 5 empty prompt
        json.dumps(openai_line("empty-messages", messages=[])),                                 # 6 empty messages
        json.dumps(openai_line("too-long", url=COMPLETIONS, prompt=too_long)),                 # 7 longer than context
        json.dumps(openai_line("bad-temp", temperature=-2)),                                    # 8 bad sampling value
        json.dumps(openai_line("bad-url", url="/v1/embeddings")),                               # 9 unsupported url
        b'{"custom_id": "bytes", "method": "POST", "url": "/v1/completions", "body": {"prompt": "\xff\xfe"}}',  # 10
        json.dumps(openai_line("tools", tools=[{"type": "function"}])),                         # 11 field not honoured
        json.dumps(openai_line("penalty", frequency_penalty=3.5)),                              # 12 out of range
        json.dumps(openai_line("ok-2", url=COMPLETIONS, max_tokens=3, temperature=0)),          # 13 ok
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in raw) + b"\n")
    out = tmp_path / "out.jsonl"
    r = cli("run", src, "-o", out, "--no-progress")
    assert r.returncode == 1, r.stderr
    assert "2 done, 11 failed" in r.stderr
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(rec["error"] is None for rec in results), "failed lines go to the errors file, as OpenAI's do"
    records = results + [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert len(records) == len(raw), "one record per input line, over the two files"
    for rec in records:
        check_openai_record(rec)
    errors = {int(rec["error"]["message"].split(":")[0].split()[1]): rec["error"]["message"]
              for rec in records if rec["error"]}
    assert sorted(errors) == list(range(2, 13))
    expected = {2: "malformed JSON", 3: "custom_id", 4: "duplicate custom_id 'ok-1'", 5: "the prompt is empty",
                6: "'messages': a conversation is a non-empty list of message dicts", 7: "max_model_len",
                8: "temperature",
                9: "unsupported url '/v1/embeddings'", 10: "UTF-8", 11: "tools", 12: "frequency_penalty"}
    for line, fragment in expected.items():
        assert fragment in errors[line], (line, errors[line])
    assert {rec["custom_id"] for rec in records if rec["error"] is None} == {"ok-1", "ok-2"}
    broken = [rec for rec in records if rec["error"] and rec["error"]["message"].startswith("line 2:")]
    assert broken[0]["custom_id"] == "broken", "the malformed line's id, as its bytes show it"


def _lines_for_resume(n=24):
    return [{"id": f"r{i}", "prompt": f"Write a short list of {i + 3} animals:", "max_tokens": 4 + (i * 7) % 40,
             "temperature": 0} for i in range(n)]


def test_sigkill_then_resume_is_exactly_once(tmp_path, default_model_dir):
    lines = _lines_for_resume()
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "batchllm.cli", "run", str(src), "-o", str(out), "--no-progress",
           "--max-num-batched-tokens", "64", "--stats", str(stats)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        if proc.poll() is not None:
            pytest.fail("the job finished before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = out.read_bytes()
    finished_before = {json.loads(x)["id"] for x in before.splitlines() if x.endswith(b"}")}
    assert 3 <= len(finished_before) < len(lines), "killed mid-way"

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    after = out.read_bytes()
    complete_before = before[: before.rfind(b"\n") + 1]
    assert after.startswith(complete_before), "finished lines are not rewritten"
    ids = [json.loads(x)["id"] for x in after.splitlines()]
    assert sorted(ids) == sorted(x["id"] for x in lines), "every line exactly once"
    resumed = json.loads(stats.read_text())
    assert resumed["num_requests"] == len(lines) - len(finished_before), "finished lines are not recomputed"


def test_torn_last_line_is_repaired_and_foreign_outputs_are_refused(tmp_path, default_model_dir):
    lines = _lines_for_resume(3)
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({**x, "max_tokens": 3}) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli("run", src, "-o", out, "--no-progress").returncode == 0
    full = out.read_bytes()
    first, second = full.splitlines(keepends=True)[:2]
    out.write_bytes(first + second[: len(second) // 2])  # a write cut off by a crash
    r = cli("run", src, "-o", out, "--no-progress")
    assert r.returncode == 0 and "torn" in r.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(rec["id"] for rec in records) == ["r0", "r1", "r2"]
    assert out.read_bytes().startswith(first)

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "x", "prompt": "different"}) + "\n")
    r = cli("run", other, "-o", out, "--no-progress")
    assert r.returncode == 2 and "different input" in r.stderr
    stray = tmp_path / "stray.jsonl"
    stray.write_text('{"id": "mine"}\n')
    r = cli("run", src, "-o", stray, "--no-progress")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert stray.read_text() == '{"id": "mine"}\n', "a refused output is left untouched"
    assert cli("run", src, "-o", stray, "--no-progress", "--overwrite").returncode == 0
    assert len(stray.read_text().splitlines()) == 3


# ---------------------------------------------------------------- issue 19: interrupts, errors file
def _long_job(tmp_path, n):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt_token_ids": [5 + i % 50, 6, 7, 8 + i % 3],
                                       "max_tokens": 20 + i % 40, "ignore_eos": True}) + "\n" for i in range(n)))
    return src


def _interrupt_when_started(cmd, out, sig):
    """SIGINT goes to the job's whole process group, as a terminal's Ctrl-C does; SIGTERM to the job alone."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        if proc.poll() is not None:
            pytest.fail("the job finished before it could be interrupted: " + proc.stderr.read())
        time.sleep(0.05)
    children = _children(proc.pid)
    signalled = time.time()
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, time.time() - signalled, children


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig, code, extra", [(signal.SIGINT, 130, []),
                                              # Ctrl-C reaches the workers too: they leave it to the parent
                                              (signal.SIGINT, 130, ["--data-parallel-size", "2"]),
                                              (signal.SIGTERM, 143, ["--data-parallel-size", "2"]),
                                              # rank 0 holds the signal to the end of its step, then stops
                                              (signal.SIGTERM, 143, ["--tensor-parallel-size", "2"])])
def test_interrupt_stops_cleanly_and_the_rerun_completes(tmp_path, tiny_model_factory, sig, code, extra):
    n = 120
    src, out = _long_job(tmp_path, n), tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "batchllm.cli", "run", str(src), "-o", str(out), "--no-progress", "--model",
           tiny_model_factory("llama"), "--max-num-seqs", "4", "--temperature", "0", *extra]
    stats = tmp_path / "stats.json"
    rc, err, seconds, children = _interrupt_when_started([*cmd, "--stats", str(stats)], out, sig)
    assert rc == code, err
    assert "Traceback" not in err, err
    last = [x for x in err.splitlines() if x.startswith("batchllm: interrupted")][-1]
    done = int(last.split(": ")[-1].split(" of ")[0].split()[-1])
    assert (f"{done} of {n} lines have results, 0 failed (recorded with an error), {n - done} left; "
            "run the same command to resume") in last, last
    records = out.read_text().splitlines()
    assert len(records) == done and 3 <= done < n, "every finished line was flushed, nothing torn"
    written = json.loads(stats.read_text())  # (none was written: a script read a missing or an older file)
    assert (written["interrupted"], written["num_lines_recorded"], written["num_lines_done"],
            written["num_lines_failed"], written["num_lines_left"]) == (sig.name, done, done, 0, n - done)
    assert seconds < 60, "the workers were stopped, not waited for"
    grace = time.time() + 15  # multiprocessing's resource tracker exits just after its parent
    while time.time() < grace and any(_alive(p) for p in children):
        time.sleep(0.2)
    assert not [_cmdline(p) for p in children if _alive(p)], "no worker outlives the job"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    after = out.read_text()
    assert after.startswith("\n".join(records) + "\n"), "finished lines are kept as they were"
    assert sorted(json.loads(x)["id"] for x in after.splitlines()) == sorted(f"r{i}" for i in range(n))


def test_a_killed_data_parallel_worker_fails_the_job_and_the_rerun_completes(tmp_path, tiny_model_factory):
    """A worker that dies mid-job (killed, OOM) is an error naming it, exit status 2 (not an unexpected
    failure); what the other worker finished is written, and the same command completes the job."""
    n = 120
    src, out = _long_job(tmp_path, n), tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "batchllm.cli", "run", str(src), "-o", str(out), "--no-progress", "--model",
           tiny_model_factory("llama"), "--max-num-seqs", "4", "--temperature", "0", "--data-parallel-size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out.exists() and out.read_bytes().count(b"\n") >= 3):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    workers = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)]
    assert len(workers) == 2, [_cmdline(p) for p in _children(proc.pid)]
    os.kill(workers[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "killed by SIGKILL" in err and "unexpected" not in err, err
    kept = out.read_text().splitlines()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    after = out.read_text()
    assert after.startswith("\n".join(kept) + "\n")
    assert sorted(json.loads(x)["id"] for x in after.splitlines()) == sorted(f"r{i}" for i in range(n))


@pytest.mark.parametrize("where", ["stats", "shutdown"])
def test_a_signal_once_every_result_is_written_leaves_the_job_complete(tmp_path, tiny_model_factory, monkeypatch,
                                                                        capsys, where):
    """Ctrl-C while --stats is written after the summary, or while the engine shuts down: every result is
    written, so the job exits 0 with its full --stats, not as interrupted (which rewrote the stats)."""
    from batchllm import cli
    from batchllm.llm import LLM

    owner, name = (cli, "_write_stats") if where == "stats" else (LLM, "shutdown")
    original = getattr(owner, name)

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    src, out, stats = _long_job(tmp_path, 3), tmp_path / "out.jsonl", tmp_path / "stats.json"
    code = cli.main(["run", str(src), "-o", str(out), "--no-progress", "--model", tiny_model_factory("llama"),
                     "--stats", str(stats)])
    err = capsys.readouterr().err
    assert code == 0 and "interrupted" not in err, err
    assert len(out.read_text().splitlines()) == 3
    assert json.loads(stats.read_text())["num_lines_done"] == 3


def test_openai_errors_go_to_their_own_file_one_record_per_custom_id(tmp_path, tiny_model_factory):
    raw = [openai_line("a", url=COMPLETIONS, max_tokens=2), openai_line("a", url=COMPLETIONS, max_tokens=2),
           openai_line("b", url=COMPLETIONS, max_tokens=2, temperature=-1),
           openai_line("c", url=COMPLETIONS, max_tokens=2)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in raw))
    out, errors = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    model = tiny_model_factory("llama")
    r = cli("run", src, "-o", out, "--no-progress", "--model", model)
    assert r.returncode == 1 and str(errors) in r.stderr
    results = [json.loads(x) for x in out.read_text().splitlines()]
    failed = [json.loads(x) for x in errors.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in results) == ["a", "c"] and all(x["error"] is None for x in results)
    assert sorted(x["custom_id"] for x in failed) == ["a", "b"]
    assert all(x["response"]["status_code"] == 400 for x in failed)
    assert "duplicate custom_id 'a'" in failed[0]["error"]["message"]
    before = (out.read_bytes(), errors.read_bytes())
    r = cli("run", src, "-o", out, "--no-progress", "--model", model)
    assert r.returncode == 1 and "already complete (4 lines: 2 done, 2 failed)" in r.stderr
    assert (out.read_bytes(), errors.read_bytes()) == before, "a rerun changes neither file"
    custom = tmp_path / "failures.jsonl"
    r = cli("run", src, "-o", tmp_path / "o2.jsonl", "--errors-file", custom, "--no-progress", "--model", model)
    assert r.returncode == 1 and len(custom.read_text().splitlines()) == 2


def test_truncate_prompt_tokens_lets_a_long_prompt_run_on_its_last_tokens(tmp_path, default_model_dir):
    """vLLM's truncate_prompt_tokens, in an OpenAI body and as a plain line's field: a prompt longer than the
    context runs on its last k tokens (-1: what the context holds beside the line's max_tokens, as vLLM keeps)
    instead of failing."""
    too_long = "word " * 400
    lines = [openai_line("cut", url=COMPLETIONS, prompt=too_long, max_tokens=3, truncate_prompt_tokens=50),
             openai_line("refused", url=COMPLETIONS, prompt=too_long, max_tokens=3),
             {"id": "plain", "prompt": too_long, "truncate_prompt_tokens": -1, "max_tokens": 5}]
    src = tmp_path / "long.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    r = cli("run", src, "-o", out, "--no-progress", "--max-model-len", "256", "--temperature", "0")
    assert r.returncode != 0, "one line fails"
    records = [json.loads(x) for x in out.read_text().splitlines()]
    cut = next(r for r in records if r.get("custom_id") == "cut")["response"]["body"]
    assert cut["usage"]["prompt_tokens"] == 50 and cut["usage"]["completion_tokens"] == 3
    plain = next(r for r in records if r.get("id") == "plain")
    assert plain["prompt_tokens"] == 256 - 5 and 1 <= plain["completion_tokens"] <= 5
    errors = (tmp_path / "out.errors.jsonl").read_text()
    assert '"refused"' in errors and "max_model_len" in errors
