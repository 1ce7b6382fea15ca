"""Prompt logprobs on SmolLM2 (fp32, CPU) against HF transformers' float32 log_softmax over the
prompt: with prefix sharing on (the shared prefix's rows computed once, for every member) and off,
prompts spanning several prefill chunks, under forced preemption, and through a JSONL job; and the logprobs
of named tokens at a generated position (logprob_token_ids) against the same reference."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from batchllm import LLM, SamplingParams
from tests.e2e.prompts import LONG_TEXT

pytestmark = pytest.mark.slow

HEAD = "You are a careful assistant. Read the text and answer briefly.\n\n" + LONG_TEXT[:400]
PROMPTS = [HEAD + "\nQuestion: Who is mentioned?", HEAD + "\nQuestion: When did it start?",
           HEAD + "\nQuestion: What changed?", "The capital of Germany is"]
KS = [3, 1, None, 2]  # the third shares the prefix but asks for nothing
TOL = 1e-4


def params():
    return [SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=k) for k in KS]


@pytest.fixture(scope="module")
def reference(default_model_dir):
    """HF's fp32 log_softmax at every prompt position: [P, vocab] per prompt (row j-1 predicts token j)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            out.append((ids, torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)))
    return out


def check_against_hf(outputs, reference):
    """Each entry: the prompt token (logprob within TOL, rank as HF's up to near-ties) and the top k
    (HF's top k ids unless the k-th is tied with the next), every logprob within TOL."""
    for o, k, (ids, logprobs) in zip(outputs, KS, reference):
        assert list(o.prompt_token_ids) == ids
        if k is None:
            assert o.prompt_logprobs is None
            continue
        assert len(o.prompt_logprobs) == len(ids) and o.prompt_logprobs[0] is None
        for j in range(1, len(ids)):
            entry, row, token = o.prompt_logprobs[j], logprobs[j - 1], ids[j]
            value = row[token].item()
            assert int((row > value + TOL).sum()) + 1 <= entry[token].rank <= int((row > value - TOL).sum()) + 1
            top = torch.topk(row, k + 1)
            if k == 0 or (top.values[k - 1] - top.values[k]).item() > TOL:
                assert set(entry) == set(top.indices[:k].tolist()) | {token}
            others = [lp.rank for t, lp in entry.items() if t != token]
            assert len(set(others)) == len(others) == len(entry) - 1 and all(r <= k for r in others)
            for t, lp in entry.items():
                assert lp.logprob == pytest.approx(row[t].item(), abs=TOL)
                assert isinstance(lp.decoded_token, str)


@pytest.mark.parametrize("sharing", [True, False])
def test_prompt_logprobs_match_hf_with_and_without_sharing(default_model_dir, reference, sharing):
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu", prefix_sharing=sharing,
              max_num_batched_tokens=32, block_size=8)
    out = llm.generate(PROMPTS, params(), use_tqdm=False)
    check_against_hf(out, reference)
    s = llm.last_stats
    if sharing:  # the shared prefix was computed once, and its rows with it
        assert s["num_groups"] == 1 and s["prefill_tokens_computed"] == s["planned_prefill_tokens"]
        assert s["prefill_tokens_computed"] < s["prompt_tokens"] - 100
    else:
        assert s["prefill_tokens_computed"] == s["prompt_tokens"]


def test_logprob_token_ids_return_those_tokens_logprobs_beside_other_rows(default_llm, reference):
    """vLLM's logprob_token_ids: the sampled token's entry first, then each named token in the order given with
    its place as rank (the sampled token's too: it is named third), in one batch with a top-k row and a row that
    asks for nothing."""
    ids, logprobs = reference[3]
    last = logprobs[-1]  # the distribution of the first generated token
    named = [5, 1000, int(last.argmax()), 42]
    outs = default_llm.generate([PROMPTS[3]] * 3, [
        SamplingParams(temperature=0, max_tokens=1, logprob_token_ids=named),
        SamplingParams(temperature=0, max_tokens=1, logprobs=2),
        SamplingParams(temperature=0, max_tokens=1)], use_tqdm=False)
    out = outs[0].outputs[0]
    token, entry = out.token_ids[0], out.logprobs[0]
    assert token == named[2] and list(entry) == [token, 5, 1000, 42]
    assert [entry[t].rank for t in (token, 5, 1000, 42)] == [3, 1, 2, 4]
    for t in named:
        assert entry[t].logprob == pytest.approx(last[t].item(), abs=TOL)
        assert isinstance(entry[t].decoded_token, str)
    assert out.cumulative_logprob == pytest.approx(last[token].item(), abs=TOL)
    assert len(outs[1].outputs[0].logprobs[0]) == 2 and outs[2].outputs[0].logprobs is None


def test_prompt_logprobs_survive_preemption(default_model_dir, reference):
    # a pool of 16 blocks of 8 tokens, admission overcommitted on purpose: requests get preempted
    # and recompute their KV; asynchronous scheduling keeps a step in flight across preemptions
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu", block_size=8, num_kv_blocks=16,
              kv_admission_threshold=4.0, max_num_batched_tokens=32, async_scheduling=True)
    out = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=k)
                                 for k in KS], use_tqdm=False)
    assert llm.last_stats["num_preemptions"] > 0
    check_against_hf(out, reference)


def test_jsonl_job_writes_prompt_logprobs(tmp_path, default_model_dir, reference):
    lines = [{"id": "a", "prompt": PROMPTS[3], "max_tokens": 2, "prompt_logprobs": 2},
             {"id": "b", "prompt": PROMPTS[3], "max_tokens": 2}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = subprocess.run([sys.executable, "-m", "batchllm.cli", "run", str(src), "-o", str(out), "--model",
                        str(default_model_dir), "--dtype", "float32", "--temperature", "0", "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    records = {rec["id"]: rec for rec in map(json.loads, out.read_text().splitlines())}
    assert "prompt_logprobs" not in records["b"]
    ids, logprobs = reference[3]
    got = records["a"]["prompt_logprobs"]
    assert len(got) == records["a"]["prompt_tokens"] == len(ids) and got[0] is None
    for j, entry in enumerate(got[1:], start=1):
        assert entry["token_id"] == ids[j]
        assert entry["logprob"] == pytest.approx(logprobs[j - 1, ids[j]].item(), abs=TOL)
        ranks = sorted(e["rank"] for e in entry["top"])
        assert ranks[:2] == [1, 2] and {e["token_id"] for e in entry["top"]} >= {ids[j]}


def test_openai_lines_carry_prompt_logprobs_where_vllm_puts_them(tmp_path, default_model_dir, reference):
    """vLLM's body field prompt_logprobs: each choice's `prompt_logprobs` in a text completion, the body's in a
    chat completion, as {token id: {"logprob", "rank", "decoded_token"}} per prompt token, the token's own first.
    In the same file, vLLM's completions `echo` and `logprob_token_ids` (`check_echo_and_named_logprobs`)."""
    def line(custom_id, url, **body):
        return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "m", "max_tokens": 2, **body}}

    cmpl, chat = "/v1/completions", "/v1/chat/completions"
    lines = [line("cmpl", cmpl, prompt=PROMPTS[3], prompt_logprobs=2, n=2, temperature=0.5),
             line("chat", chat, messages=[{"role": "user", "content": "Hi"}], prompt_logprobs=0),
             line("none", cmpl, prompt=PROMPTS[3]),
             line("echo", cmpl, prompt=PROMPTS[3], echo=True, logprobs=1, temperature=0),
             line("score", cmpl, prompt=PROMPTS[3], echo=True, logprobs=0, max_tokens=0),
             line("echo-text", cmpl, prompt=PROMPTS[3], echo=True, temperature=0),
             line("labels", chat, messages=[{"role": "user", "content": "Hi"}], logprobs=True,
                  logprob_token_ids=[5, 1000], max_tokens=1, temperature=0),
             line("echo-ids", cmpl, prompt=[5, 6], echo=True),
             line("echo-chat", chat, messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content":
                  "Hello"}], echo=True, add_generation_prompt=False, continue_final_message=True, temperature=0),
             line("labels-alone", chat, messages=[{"role": "user", "content": "Hi"}], logprob_token_ids=[5]),
             line("echo-chat-top", chat, messages=[{"role": "user", "content": "Hi"}], echo=True, logprobs=True,
                  top_logprobs=2, temperature=0)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = subprocess.run([sys.executable, "-m", "batchllm.cli", "run", str(src), "-o", str(out), "--model",
                        str(default_model_dir), "--dtype", "float32", "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr  # (two lines fail)
    text = out.read_text() + (tmp_path / "out.errors.jsonl").read_text()  # (OpenAI's: failed lines go there)
    records = {rec["custom_id"]: rec for rec in map(json.loads, text.splitlines())}
    check_echo_and_named_logprobs(records, default_model_dir, reference)
    bodies = {i: rec["response"]["body"] for i, rec in records.items() if rec["response"] is not None}
    ids, logprobs = reference[3]
    choices = bodies["cmpl"]["choices"]
    assert len(choices) == 2 and choices[0]["prompt_logprobs"] == choices[1]["prompt_logprobs"]
    got = choices[0]["prompt_logprobs"]
    assert len(got) == bodies["cmpl"]["usage"]["prompt_tokens"] == len(ids) and got[0] is None
    for j, entry in enumerate(got[1:], start=1):
        own = next(iter(entry))
        assert own == str(ids[j]) and entry[own]["logprob"] == pytest.approx(logprobs[j - 1, ids[j]].item(), abs=TOL)
        assert {e["rank"] for e in entry.values()} >= {1, 2} and isinstance(entry[own]["decoded_token"], str)
    chat = bodies["chat"]["prompt_logprobs"]
    assert chat[0] is None and all(len(e) == 1 for e in chat[1:]), "k = 0: the prompt token's own only"
    assert len(chat) == bodies["chat"]["usage"]["prompt_tokens"]
    assert bodies["none"]["choices"][0]["prompt_logprobs"] is None, "not asked: null, as vLLM writes it"
    assert "prompt_logprobs" not in bodies["chat"]["choices"][0], "a chat's are the body's"
    # vLLM's chat echo asks for top_logprobs prompt logprobs (0 where not given): they were null
    echoed = bodies["echo-chat"]["prompt_logprobs"]
    assert echoed[0] is None and len(echoed) == bodies["echo-chat"]["usage"]["prompt_tokens"]
    assert all(len(e) == 1 for e in echoed[1:]), "top_logprobs 0: each prompt token's own only"
    top = bodies["echo-chat-top"]["prompt_logprobs"]
    assert top[0] is None and len(top) == bodies["echo-chat-top"]["usage"]["prompt_tokens"]
    assert all({e["rank"] for e in entry.values()} >= {1, 2} and len(entry) <= 3 for entry in top[1:])


def check_echo_and_named_logprobs(records, model_dir, reference):
    """echo: the prompt's text, tokens and logprobs (its first token's null, named by the tokenizer) before the
    output's; with max_tokens 0 the prompt alone (scoring a text). logprob_token_ids: the sampled token's entry and
    the named tokens' in top_logprobs. Refused: echo of token ids, logprob_token_ids
    without logprobs; a chat's echo starts the answer with the message it continues."""
    from transformers import AutoTokenizer

    ids, logprobs = reference[3]
    first = AutoTokenizer.from_pretrained(str(model_dir)).decode([ids[0]])
    for name, generated in (("echo", 2), ("score", 0)):
        choice = records[name]["response"]["body"]["choices"][0]
        got = choice["logprobs"]
        assert choice["text"].startswith(PROMPTS[3]) and len(got["tokens"]) == len(ids) + generated
        assert got["tokens"][0] == first and got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
        for j in range(1, len(ids)):
            assert got["token_logprobs"][j] == pytest.approx(logprobs[j - 1, ids[j]].item(), abs=TOL)
        assert got["text_offset"][1] == len(first) and got["text_offset"][:1] == [0]
    assert records["score"]["response"]["body"]["choices"][0]["text"] == PROMPTS[3]
    echo_text = records["echo-text"]["response"]["body"]["choices"][0]
    assert echo_text["text"].startswith(PROMPTS[3]) and len(echo_text["text"]) > len(PROMPTS[3])
    assert echo_text["logprobs"] is None
    labels = records["labels"]["response"]["body"]["choices"][0]["logprobs"]["content"][0]
    assert [t["token"] for t in labels["top_logprobs"]][-2:] == [AutoTokenizer.from_pretrained(
        str(model_dir)).convert_ids_to_tokens(t).replace("\u0120", " ") for t in (5, 1000)]
    assert labels["top_logprobs"][0]["token"] == labels["token"] and len(labels["top_logprobs"]) == 3
    continued = records["echo-chat"]["response"]["body"]["choices"][0]["message"]  # (vLLM's chat echo)
    assert continued["role"] == "assistant" and continued["content"].startswith("Hello"), continued
    assert len(continued["content"]) > len("Hello")
    for name, message in (("echo-ids", "'echo' needs the prompt as text"),
                          ("labels-alone", "'logprob_token_ids' needs logprobs true")):
        assert records[name]["response"]["status_code"] == 400 and message in records[name]["error"]["message"], name
