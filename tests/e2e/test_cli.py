"""The CLI on the default model: JSONL in, JSONL out, ids preserved, bad lines recorded."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "batchllm.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_jsonl_round_trip_on_the_default_model(tmp_path, default_model_dir):
    lines = [
        {"id": "chat-1", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
        {"id": 7, "prompt": "The capital of Germany is", "max_tokens": 5},
        {"id": "ids", "prompt_token_ids": [504, 3575, 282], "max_tokens": 4, "stop": ["zzz"]},
        {"id": "sampled", "prompt": "Tell me a joke.", "temperature": 0.9, "seed": 3, "max_tokens": 6},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    stats = tmp_path / "stats.json"
    r = run_cli("run", src, "-o", out, "--temperature", "0", "--max-tokens", "12", "--stats", stats, "--no-progress")
    assert r.returncode == 0, r.stderr
    records = {rec["id"]: rec for rec in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"chat-1", 7, "ids", "sampled"}, "an integer id is echoed as an integer"
    assert records["chat-1"]["text"] == "The capital of France is Paris."
    assert records["chat-1"]["finish_reason"] == "stop"
    assert records[7]["completion_tokens"] == 5 and records[7]["finish_reason"] == "length"
    assert records["ids"]["prompt_tokens"] == 3 and len(records["ids"]["token_ids"]) == 4
    for rec in records.values():
        assert set(rec) >= {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}
        assert rec["completion_tokens"] == len(rec["token_ids"])
        assert 0 <= rec["cached_tokens"] < rec["prompt_tokens"]
    s = json.loads(stats.read_text())
    assert s["num_requests"] == 4 and s["output_tokens"] == sum(r["completion_tokens"] for r in records.values())
    assert sum(r["prompt_tokens"] - r["cached_tokens"] for r in records.values()) == s["prefill_tokens_computed"]
    # the input was read while the engine was built: the run waited for at most what reading took
    assert s["engine_build_s"] > 0 and s["input_read_s"] > 0
    # where the build went, phase by phase (on CPU: no activation reserve is measured, no graphs captured)
    assert list(s["build_phases"]) == ["model", "kv_cache", "kernel_warmup", "scheduler"]
    assert 0 < sum(s["build_phases"].values()) < s["engine_build_s"]
    assert 0 <= s["input_read_wait_s"] <= s["input_read_s"] and s["input_read_wait_s"] <= s["wall_s"]
    assert "4 done, 0 failed" in r.stderr


def test_bad_lines_get_named_errors_and_the_rest_runs(tmp_path, default_model_dir):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join([
        b'{"id": "ok", "prompt": "Hello", "max_tokens": 3}',
        b'{"id": "broken", "prompt": ',
        b'{"prompt": "no id"}',
        b'{"id": "ok", "prompt": "duplicate"}',
        b'{"id": "empty", "prompt": ""}',
        b'{"id": "temp", "prompt": "x", "temperature": -1}',
        b'{"id": "field", "prompt": "x", "frequency_penalty": 5}',
        b'{"id": "bytes", "prompt": "\xff\xfe"}',
        b'{"id": "ok2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}',
    ]) + b"\n")
    out = tmp_path / "out.jsonl"
    r = run_cli("run", src, "-o", out, "--temperature", "0", "--no-progress")
    assert r.returncode == 1, r.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 9
    errors = {rec["error"]["line"]: rec["error"]["message"] for rec in records if "error" in rec}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7, 8]
    assert "malformed JSON" in errors[2]
    assert "missing 'id'" in errors[3]
    assert "duplicate id 'ok'" in errors[4]
    assert "empty" in errors[5]
    assert "temperature" in errors[6]
    assert "frequency_penalty" in errors[7]
    assert "UTF-8" in errors[8]
    assert {rec["id"] for rec in records if "text" in rec} == {"ok", "ok2"}
    assert "2 done, 7 failed" in r.stderr


def test_the_cli_imports_no_torch_before_it_needs_the_model():
    """`batchllm` loads torch, transformers and Triton (seconds) only to run the model: its help and
    the checks of the options and files answer at once; `batchllm.LLM` still imports on first use."""
    code = ("import sys, batchllm, batchllm.cli; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'LLM' in dir(batchllm) and 'SamplingParams' in dir(batchllm); "
            "from batchllm import LLM; assert 'torch' in sys.modules and LLM.__name__ == 'LLM'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_unreadable_input_and_bad_model_fail_fast(tmp_path):
    r = run_cli("run", tmp_path / "missing.jsonl", "-o", tmp_path / "o.jsonl")
    assert r.returncode == 2 and "cannot read input file" in r.stderr
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "x"}\n')
    r = run_cli("run", src, "-o", tmp_path / "o.jsonl", "--model", tmp_path / "nope")
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    r = run_cli("run", src, "-o", tmp_path / "o.jsonl", "--model", tmp_path / "m")
    assert r.returncode == 2 and "unsupported architecture" in r.stderr


def test_help_documents_every_option():
    r = run_cli("run", "--help")
    assert r.returncode == 0
    for option in ("--model", "--max-tokens", "--temperature", "--seed", "--top-p", "--top-k", "--stop",
                   "--stats", "--max-num-batched-tokens", "--dtype", "--async-scheduling", "--enforce-eager",
                   "--max-cudagraph-capture-size"):
        assert option in r.stdout


def test_plan_matches_what_run_computes_and_sharing_off_gives_the_same_tokens(tmp_path, default_model_dir):
    import random

    rng = random.Random(0)
    lines = []
    for g in range(3):
        prefix = [rng.randrange(100, 40000) for _ in range(40 + 7 * g)]
        for m in range(4):
            suffix = [rng.randrange(100, 40000) for _ in range(rng.randrange(3, 12))]
            lines.append({"id": f"g{g}m{m}", "prompt_token_ids": prefix + suffix, "max_tokens": 4})
    rng.shuffle(lines)
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")

    r = run_cli("plan", src, "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    prompt_tokens = sum(len(x["prompt_token_ids"]) for x in lines)
    assert plan["num_requests"] == 12 and plan["num_groups"] == 3
    assert plan["mean_sharing_degree"] == 4 and plan["max_sharing_degree"] == 4
    assert plan["prompt_tokens"] == prompt_tokens
    assert plan["prefill_tokens"] == prompt_tokens - 3 * sum(40 + 7 * g for g in range(3))
    assert plan["saving_ratio"] == pytest.approx(1 - plan["prefill_tokens"] / prompt_tokens)
    human = run_cli("plan", src)
    assert "saving ratio" in human.stdout and "prefill tokens" in human.stdout

    results = {}
    for flag in ([], ["--no-prefix-sharing"]):
        out, stats = tmp_path / f"out{len(flag)}.jsonl", tmp_path / f"stats{len(flag)}.json"
        r = run_cli("run", src, "-o", out, "--temperature", "0", "--stats", stats, "--no-progress", *flag)
        assert r.returncode == 0, r.stderr
        s = json.loads(stats.read_text())
        for key in ("num_requests", "prompt_tokens", "prefill_tokens_computed", "output_tokens", "saving_ratio",
                    "num_steps", "mean_tokens_per_step", "wall_s"):
            assert key in s
        results[bool(flag)] = ({rec["id"]: rec["token_ids"] for rec in map(json.loads, out.read_text().splitlines())},
                               s)
    (shared_tokens, shared), (plain_tokens, plain) = results[False], results[True]
    assert shared_tokens == plain_tokens
    assert shared["prefill_tokens_computed"] == plan["prefill_tokens"]
    assert shared["saving_ratio"] == pytest.approx(plan["saving_ratio"])
    assert plain["prefill_tokens_computed"] == prompt_tokens and plain["saving_ratio"] == 0


def test_version_and_the_run_batch_spelling_of_the_input(tmp_path, default_model_dir):
    from importlib.metadata import version

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"batchllm {version('batchllm')}"
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"id": f"q{i}", "prompt": p}) for i, p in enumerate(
        ["You are a helpful assistant. Answer briefly. What is 2+2?",
         "You are a helpful assistant. Answer briefly. Name a colour.",
         "You are a helpful assistant. Answer briefly. Say hi.",
         "Translate to French: cheese"])) + "\n")
    positional, option = run_cli("plan", src, "--json"), run_cli("plan", "-i", src, "--json")
    assert positional.returncode == option.returncode == 0 and positional.stdout.split('"plan_seconds"')[0] == \
        option.stdout.split('"plan_seconds"')[0]
    both = run_cli("run", src, "-i", src, "-o", tmp_path / "o.jsonl")
    assert both.returncode == 2 and "not both" in both.stderr
    groups = run_cli("plan", "-i", src, "--groups", "5", "--json")
    listed = json.loads(groups.stdout)["largest_groups"]
    assert len(listed) == 1 and listed[0]["members"] == 3, "the three prompts with the shared instruction"
    assert listed[0]["prefix_start"].startswith("You are a helpful assistant. Answer briefly.")
    text = run_cli("plan", src, "--groups", "1")
    assert "largest groups" in text.stdout and "'You are a helpful assistant." in text.stdout


def test_weights_that_fail_to_load_end_the_job_cleanly_while_its_input_is_read(tmp_path, tiny_model_factory):
    """`run` reads and tokenizes its input in a background thread while the engine loads: a load
    failure still ends the job at once with status 2 and the loader's message, writing no results."""
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_model_factory("llama"), model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": f"question {i}"}) + "\n" for i in range(20_000)))
    for engines in ("1", "2"):  # 2: the engines are worker processes, which the parent starts first
        r = run_cli("run", src, "-o", tmp_path / "o.jsonl", "--model", model, "--device", "cpu", "--no-progress",
                    "--engines-per-gpu", engines)
        assert r.returncode == 2, r.stderr
        assert "safetensors" in r.stderr.lower()
        assert engines == "1" or re.search(r"data-parallel worker [01] could not start", r.stderr)
        assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


def test_a_kv_cache_the_machine_cannot_allocate_is_a_job_that_could_not_start(tmp_path, tiny_model_factory):
    """One engine: "unexpected failure: RuntimeError" with status 3; data parallel said "could not start" with
    status 2. Both say it now (status 2: the job could not start)."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": 1, "prompt": "x"}) + "\n")
    r = run_cli("run", src, "-o", tmp_path / "o.jsonl", "--model", tiny_model_factory("llama"), "--device", "cpu",
                "--no-progress", "--kv-cache-memory-gib", "100000")
    assert r.returncode == 2 and "the engine could not start: RuntimeError" in r.stderr, r.stderr


def test_a_failure_of_the_code_while_the_engine_is_built_stays_unexpected(tmp_path, tiny_model_factory, monkeypatch,
                                                                             capsys):
    """Only memory the machine refuses is a job that could not start: another RuntimeError (a bug) keeps status 3
    and its traceback under --debug."""
    from batchllm.cli import main
    from batchllm.llm import LLM

    def broken(*args, **kwargs):
        raise RuntimeError("shape '[2, 2]' is invalid for input of size 3")

    monkeypatch.setattr(LLM, "from_config", broken)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": 1, "prompt": "x"}) + "\n")
    assert main(["run", str(src), "-o", str(tmp_path / "o.jsonl"), "--model", tiny_model_factory("llama"),
                 "--device", "cpu", "--no-progress"]) == 3
    assert "unexpected failure: RuntimeError: shape" in capsys.readouterr().err


def test_a_line_the_kv_cache_cannot_hold_fails_alone(tmp_path, default_model_dir):
    """A request needing more KV cache than the engine has stopped the whole job (exit 3, "request '0-4-0'
    may need 7 KV blocks", no results); now its line fails, named, and the others run."""
    lines = [{"id": f"ok-{i}", "prompt": f"Say {i}", "max_tokens": 2} for i in range(4)]
    lines.insert(2, {"id": "big", "prompt": "word " * 100, "max_tokens": 4})
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = run_cli("run", src, "-o", out, "--kv-cache-memory-gib", "0.004", "--no-progress")
    assert r.returncode == 1, r.stderr
    records = {rec["id"]: rec for rec in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"ok-0", "ok-1", "ok-2", "ok-3", "big"}
    message = records["big"]["error"]["message"]
    assert message.startswith("line 3: the prompt (") and "tokens of KV cache, but the cache holds" in message
    assert "; give the cache more memory (--kv-cache-memory-gib, --gpu-memory-utilization) or lower max_tokens" \
        in message, "the cache is sized by memory here"
    assert all(len(records[f"ok-{i}"]["token_ids"]) == 2 for i in range(4))


def test_generate_refuses_a_prompt_the_kv_cache_cannot_hold(tiny_model_factory):
    from batchllm import LLM, SamplingParams

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=4,
              block_size=16)
    try:
        assert llm.kv_cache_tokens == 64
        # num_kv_blocks fixes the cache's size over the memory settings: raising those would change nothing
        # 60 + 10 tokens write 69 (the last output token is never written: `kv_tokens_written`)
        with pytest.raises(ValueError, match=r"prompt 1: the prompt \(60 tokens\) and its completion may need 69 "
                                             r"tokens of KV cache, but the cache holds 64; raise num_kv_blocks "
                                             r"\(--num-kv-blocks, now 4\), which fixes the cache's size over "
                                             r"--kv-cache-memory-gib and --gpu-memory-utilization or lower max_tokens"):
            llm.generate([[5] * 10, [5] * 60], SamplingParams(max_tokens=10), use_tqdm=False)
        # max_tokens None: up to the context or to what the cache holds (Scheduler._max_total_tokens)
        with pytest.raises(ValueError, match=r"the prompt \(65 tokens\) and its completion may need 65"):
            llm.generate([[5] * 65], SamplingParams(max_tokens=None), use_tqdm=False)
        unbounded = llm.generate([[5] * 10], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)
        assert len(unbounded[0].outputs[0].token_ids) == 64 - 10 + 1
        assert len(llm.generate([[5] * 64], SamplingParams(max_tokens=None), use_tqdm=False)[0].outputs[0].token_ids) \
            == 1, "a prompt filling the cache writes it whole and samples one token"
        assert len(llm.generate([[5] * 10], SamplingParams(max_tokens=10), use_tqdm=False)[0].outputs[0].token_ids)
    finally:
        llm.shutdown()


def test_plan_of_an_input_without_requests_is_empty_as_run_is(tmp_path, default_model_dir):
    """`run` answers an empty input with an empty output and status 0; `plan` failed it with status 2."""
    empty, bad = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("\n")
    bad.write_text('{"id": "a"}\n')
    r = run_cli("plan", empty, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["num_requests"] == 0, r.stderr
    r = run_cli("plan", bad, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["num_lines_failed"] == 1 and "line 1:" in r.stderr
    logprobs = tmp_path / "logprobs.jsonl"  # past run's max_logprobs (20): plan said it would run
    logprobs.write_text('{"id": "a", "prompt": "Hi", "logprobs": 21}\n{"id": "b", "prompt": "Hi", "logprobs": 3}\n')
    r = run_cli("plan", logprobs, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["num_lines_failed"] == 1 and "max_logprobs (20)" in r.stderr
    r = run_cli("plan", logprobs, "--json", "--max-logprobs", "21")
    assert r.returncode == 0 and json.loads(r.stdout)["num_lines_failed"] == 0, r.stderr


def test_plan_into_a_reader_that_closes_early_ends_quietly_as_a_pipe_tool(tmp_path, default_model_dir):
    """`batchllm plan big.jsonl | head` ended in "unexpected failure: BrokenPipeError", exit status 3 (a code
    failure); it now ends as a tool the pipe's SIGPIPE stops: status 141, nothing on stderr."""
    import os

    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"id": i, "prompt_token_ids": [1, 2, 3, i % 600 + 5, 7]}) + "\n"
                           for i in range(1200)))
    read, write = os.pipe()
    os.close(read)  # (the reader is gone before the first line: every write fails)
    try:
        r = subprocess.run([sys.executable, "-m", "batchllm", "plan", str(big), "--groups", "100000"],
                           stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert r.returncode == 141 and "unexpected" not in r.stderr and "Error" not in r.stderr, r.stderr


def test_plan_reads_lines_with_runs_max_tokens(tmp_path, default_model_dir):
    """plan read every line without max_tokens as SamplingParams' 16, where run gives a plain line 256 and an
    OpenAI chat line the context: it failed lines run answers (min_tokens 20) and counted -1 truncation wrong."""
    src = tmp_path / "in.jsonl"
    chat = {"messages": [{"role": "user", "content": "Hi"}], "min_tokens": 20}
    src.write_text(json.dumps({"id": "m", "prompt": "Tell me a story", "min_tokens": 20}) + "\n"
                   + json.dumps({"custom_id": "c", "url": "/v1/chat/completions", "body": chat}) + "\n"
                   + json.dumps({"id": "t", "prompt": "word " * 300, "truncate_prompt_tokens": -1}) + "\n")
    r = run_cli("plan", src, "--json", "--max-model-len", "512")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] < 300 + 30, "the long prompt keeps 512 - 256 tokens, as in run"
    r = run_cli("plan", src, "--json", "--max-tokens", "4")
    assert r.returncode == 1 and "min_tokens must be <= max_tokens (4)" in r.stderr, r.stderr


def test_members_the_cache_holds_only_unshared_run_unshared(tiny_model_factory):
    """A request that fits the cache alone, but not with a copy of its shared prefix's last block, stopped
    the engine ("may need 5 KV blocks but the cache has 4"); it now runs without sharing, with the same
    tokens as alone."""
    from batchllm import LLM, SamplingParams

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=4,
              block_size=16)
    try:
        greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        prompts = [[5] * 40 + [7, 8], [5] * 40 + [9, 10]]  # 52 tokens each: 4 blocks, 5 with a prefix copy
        together = llm.generate(prompts, greedy, use_tqdm=False)
        alone = [llm.generate([p], greedy, use_tqdm=False)[0] for p in prompts]
        assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
        two = llm.generate([[5] * 44], SamplingParams(max_tokens=10, n=2, temperature=1.0, seed=1, ignore_eos=True),
                           use_tqdm=False)[0]
        assert [len(c.token_ids) for c in two.outputs] == [10, 10]
    finally:
        llm.shutdown()


def test_plan_groups_show_a_nested_groups_own_part_and_a_single_ungrouped_request(tmp_path, default_model_dir, capsys):
    """A nested group's "prefix starts with" repeated its parent's first words (the two rows of examples/prompts.jsonl
    read alike), and one ungrouped request was "1 requests ungrouped". A nested group now shows its own part of the
    prefix, past its parent's, marked as such (JSON: parent_prefix_tokens, prefix_own)."""
    from batchllm.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate([
        "Shared opening words of every line here. First topic: apples are red and sweet.",
        "Shared opening words of every line here. First topic: apples are red and sour.",
        "Shared opening words of every line here. Second topic: the sea.",
        "Something else entirely."])))
    assert main(["plan", str(src), "--groups", "5", "--json"]) == 0
    top, nested = json.loads(capsys.readouterr().out)["largest_groups"]
    assert "prefix_own" not in top and nested["prefix_start"].startswith("Shared opening words")
    assert nested["parent_prefix_tokens"] == top["prefix_tokens"] < nested["prefix_tokens"]
    assert nested["prefix_own"].startswith("First topic: apples are red and")
    assert main(["plan", str(src), "--groups", "5"]) == 0
    out = capsys.readouterr().out
    assert "1 request ungrouped" in out
    assert re.search(r"\+ 'First topic: apples are red and' \(after its parent's \d+-token prefix\)", out), out
    assert re.search(r"  'Shared opening words of every line here\.'", out), out


def test_plan_groups_list_a_chat_files_documents_not_the_templates_opening(tmp_path, default_model_dir):
    """Chat lines all share the template's opening (a top-level group of a few tokens), under which each
    document's questions nest: --groups listed only that opening ("12 members, 3 prefix tokens")."""
    documents = [f"Document {d}: " + " ".join(f"fact {d}.{k} is about topic {k}." for k in range(12))
                 for d in range(3)]
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"id": f"{d}-{q}", "messages": [
        {"role": "system", "content": doc}, {"role": "user", "content": f"Question {q}?"}]}) + "\n"
        for d, doc in enumerate(documents) for q in range(4)))
    r = run_cli("plan", src, "--groups", "3", "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)["largest_groups"]
    assert sorted(g["members"] for g in listed) == [4, 4, 4], listed
    assert all(g["prefix_tokens"] > 50 and g["saves_tokens"] > 3 * 40 for g in listed), listed
    assert sorted(next(w for w in g["prefix_start"].split() if w.isdigit() or w.endswith(":"))
                  for g in listed) == ["0:", "1:", "2:"], listed
