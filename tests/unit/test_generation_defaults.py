"""A model's sampling defaults from its generation_config.json (`batchllm.generation_defaults`), as vLLM
takes them: for `batchllm run` where the command line sets none (tests/unit/test_job_files.py) and for
`LLM` calls without SamplingParams."""

from __future__ import annotations

import json
import shutil

import pytest

from batchllm.generation_defaults import model_sampling_defaults

QWEN3 = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [151645, 151643],
         "pad_token_id": 151643, "transformers_version": "4.51.0"}


def test_the_files_sampling_fields_and_nothing_else(tmp_path):
    assert model_sampling_defaults(tmp_path) == {} and model_sampling_defaults(None) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(QWEN3))
    assert model_sampling_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"top_k": 50, "temperature": None, "max_new_tokens": 128, "repetition_penalty": 1.1}))
    assert model_sampling_defaults(tmp_path) == {"top_k": 50, "max_tokens": 128, "repetition_penalty": 1.1}, \
        "what the file sets, whatever transformers' own defaults are"


@pytest.mark.parametrize("content, named", [('{"temperature": "0.6"}', "temperature"),
                                            ('{"max_new_tokens": "3"}', "max_tokens"),
                                            ("[1, 2]", "not a JSON object")])
def test_a_bad_file_is_named(tmp_path, content, named):
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(ValueError, match="generation_config.json") as info:
        model_sampling_defaults(tmp_path)
    assert named in str(info.value)


@pytest.mark.parametrize("content", ["{oops", ""])
def test_a_file_that_is_not_json_gives_no_defaults_with_a_warning(tmp_path, content, caplog):
    """A generation_config.json cut short or empty failed the model (LLM and run alike, even with every sampling
    option given); vLLM falls back from it to config.json, which sets no sampling defaults, and runs."""
    import logging

    (tmp_path / "generation_config.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="batchllm"):
        assert model_sampling_defaults(tmp_path) == {}
    assert "generation_config.json' is not JSON" in caplog.text and "no sampling defaults" in caplog.text


def test_llm_calls_without_sampling_params_use_them(tmp_path, tiny_model_factory, caplog):
    """...and say so once, the first time they are taken (vLLM's get_diff_sampling_param warns once)."""
    import logging

    from batchllm import LLM

    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), model)
    (model / "generation_config.json").write_text(json.dumps({**QWEN3, "max_new_tokens": 3, "eos_token_id": 2}))
    llm = LLM(str(model), device="cpu", dtype="float32", max_model_len=128)
    try:
        with caplog.at_level(logging.WARNING, logger="batchllm"):
            llm.generate(["Hi there"], use_tqdm=False)
            llm.generate(["Hi there"], use_tqdm=False)
        said = [r.getMessage() for r in caplog.records if "default sampling parameters" in r.getMessage()]
        assert len(said) == 1 and "the model's generation_config.json" in said[0] and "'temperature': 0.6" in said[0]
        defaults = llm.get_default_sampling_params()
        assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.max_tokens) == (0.6, 0.95, 20, 3)
        out = llm.generate(["Hi there"], use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) <= 3
        # vLLM's examples change the object they get: a new one each call, so the LLM's defaults stay
        defaults.max_tokens, defaults.temperature = 1, 0.0
        assert llm.get_default_sampling_params() is not defaults
        assert llm.get_default_sampling_params().max_tokens == 3
        assert len(llm.generate(["Hi there"], defaults, use_tqdm=False)[0].outputs[0].token_ids) == 1
    finally:
        llm.shutdown()


def test_a_call_without_sampling_params_samples_as_the_files_settings_given_explicitly(tmp_path, tiny_model_factory):
    """The call without params draws what a call with the file's settings spelled out draws (same engine seed),
    and not what the bare SamplingParams defaults draw: the defaults reach the sampler, not only the getter."""
    from batchllm import LLM, SamplingParams

    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), model)
    (model / "generation_config.json").write_text(json.dumps({**QWEN3, "max_new_tokens": 6, "eos_token_id": 2}))
    prompts = ["Hi there", "Once upon a time", "The weather"] * 4

    def drawn(params):
        llm = LLM(str(model), device="cpu", dtype="float32", max_model_len=128, seed=11)
        try:
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.shutdown()

    by_default = drawn(None)
    assert by_default == drawn(SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_tokens=6))
    assert by_default != drawn(SamplingParams(max_tokens=6))


def test_the_generation_config_option_picks_the_file_or_none(tmp_path):
    """vLLM's --generation-config: auto (the model's file), vllm (none), or a folder holding one."""
    model, other = tmp_path / "model", tmp_path / "other"
    model.mkdir(), other.mkdir()
    (model / "generation_config.json").write_text(json.dumps(QWEN3))
    (other / "generation_config.json").write_text('{"temperature": 0.2}')
    assert model_sampling_defaults(model, "vllm") == {}
    assert model_sampling_defaults(model, str(other)) == {"temperature": 0.2}
    with pytest.raises(ValueError, match="no generation_config.json there"):
        model_sampling_defaults(model, str(tmp_path / "missing"))


def test_run_with_generation_config_vllm_keeps_its_own_defaults(tmp_path, capsys, tiny_model_factory):
    from batchllm import cli

    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), model)
    (model / "generation_config.json").write_text(json.dumps({**QWEN3, "eos_token_id": 2}))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi", "max_tokens": 2}\n')
    code = cli.main(["run", str(src), "-o", str(out), "--model", str(model), "--generation-config", "vllm",
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0 and "generation_config.json" not in err, err
    options = json.loads((tmp_path / "out.jsonl.batchllm-state").read_text())["options"]
    assert (options["temperature"], options["top_p"], options["top_k"]) == (1.0, 1.0, 0)


def test_eos_ids_come_from_the_file_the_option_picks(tmp_path):
    """As vLLM's --generation-config: a folder's file gives the EOS ids too (they were read from the
    model's file whatever the option); "vllm" takes no sampling defaults but still the model's EOS ids."""
    from batchllm.generation_defaults import generation_eos_token_ids

    model, other = tmp_path / "model", tmp_path / "other"
    model.mkdir(), other.mkdir()
    (model / "generation_config.json").write_text(json.dumps(QWEN3))
    (other / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert generation_eos_token_ids(model) == generation_eos_token_ids(model, "vllm") == [151645, 151643]
    assert generation_eos_token_ids(model, str(other)) == [7]
    assert generation_eos_token_ids(tmp_path) == [] and generation_eos_token_ids(None) == []
    (model / "generation_config.json").write_text("{oops")
    assert generation_eos_token_ids(model) == [], "unreadable: model_sampling_defaults names it"


def test_an_llm_stops_at_the_eos_of_the_generation_config_folder(tmp_path, tiny_model_factory):
    """The engine's EOS set follows --generation-config DIR: greedy output cut at the first token that
    DIR's file names as its eos_token_id."""
    from batchllm import LLM, SamplingParams

    model, other = tmp_path / "model", tmp_path / "other"
    shutil.copytree(tiny_model_factory("llama"), model)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    llm = LLM(str(model), device="cpu", dtype="float32", max_model_len=128)
    try:
        free = llm.generate(["Hi there"], params, use_tqdm=False)[0].outputs[0].token_ids
    finally:
        llm.shutdown()
    stop_at = free[2]
    assert stop_at not in free[:2], "the test needs a token first generated at position 2"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop_at]}))
    llm = LLM(str(model), device="cpu", dtype="float32", max_model_len=128, generation_config=str(other))
    try:
        out = llm.generate(["Hi there"], params, use_tqdm=False)[0].outputs[0]
    finally:
        llm.shutdown()
    assert list(out.token_ids) == list(free[:3]) and out.finish_reason == "stop"


def test_config_json_eos_ids_end_answers_only_without_a_generation_config(tmp_path, tiny_model_factory):
    """As vLLM and transformers: the model's generation_config.json gives the EOS ids; config.json's count
    only where there is none (they were always added). HF greedy on the same folder is the oracle."""
    from batchllm import LLM, SamplingParams
    from tests.helpers import hf_greedy

    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), model)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=False)

    def greedy() -> list[int]:
        llm = LLM(str(model), device="cpu", dtype="float32", max_model_len=128)
        try:
            return list(llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)[0].outputs[0].token_ids)
        finally:
            llm.shutdown()

    free = greedy()
    stop_at = free[2]
    assert stop_at not in free[:2] and len(free) == 8, "the test needs a token first generated at position 2"
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "eos_token_id": [config["eos_token_id"], stop_at]}))
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": config["eos_token_id"]}))
    assert greedy() == free == hf_greedy(model, [[5, 6, 7]], 8)[0]
    (model / "generation_config.json").unlink()
    assert greedy() == free[:3] == hf_greedy(model, [[5, 6, 7]], 8)[0]


def test_a_resume_under_another_generation_config_folders_eos_is_refused(tmp_path, capsys, tiny_model_factory):
    """--generation-config DIR decides the EOS ids, so answers; the state file did not record them."""
    from batchllm import cli

    model, first, second = tmp_path / "model", tmp_path / "first", tmp_path / "second"
    shutil.copytree(tiny_model_factory("llama"), model)
    for folder, eos in ((first, 3), (second, 4)):
        folder.mkdir()
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi", "max_tokens": 2}\n{"id": "b", "prompt": "Yo", "max_tokens": 2}\n')
    run = ["run", str(src), "-o", str(out), "--model", str(model), "--no-progress", "--temperature", "0"]
    assert cli.main([*run, "--generation-config", str(first)]) == 0
    assert cli.main([*run, "--generation-config", str(second)]) == 2
    assert "generation_eos_token_ids [3] -> [4]" in capsys.readouterr().err
    assert cli.main([*run, "--generation-config", str(first)]) == 0, "the same folder resumes"


def _usage(out) -> dict:
    """Each record's (prompt tokens, completion tokens), by its id or custom_id."""
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return {r.get("custom_id") or r["id"]: (r["response"]["body"]["usage"]["prompt_tokens"],
                             r["response"]["body"]["usage"]["completion_tokens"]) if "response" in r
            else (r["prompt_tokens"], r["completion_tokens"]) for r in records}


@pytest.mark.parametrize("option, from_model, chat_tokens, completion_tokens, plain_tokens", [
    # run's own default: an OpenAI chat line runs to the context, a completions line to 16 tokens (OpenAI, vLLM)
    ([], None, None, 16, 256),
    (["--max-tokens", "5"], None, 5, 5, 5),  # the command line's default applies to all
    ([], 7, 7, 16, 7),                       # the model's max_new_tokens: chat's and plain lines' default; a
                                             # completion keeps its request's 16, as in vLLM's server
])
def test_an_openai_line_without_max_tokens_takes_its_endpoints_default(tmp_path, capsys, tiny_model_factory, option,
                                                                       from_model, chat_tokens, completion_tokens,
                                                                       plain_tokens):
    """An OpenAI Batch line without max_tokens was cut at run's own 256 tokens: OpenAI's API and vLLM's
    run-batch generate a chat answer up to the context then, and a completion to 16 tokens (the default
    max_tokens of /v1/completions in both). A plain line keeps run's default."""
    from batchllm import cli

    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), model)
    if from_model is not None:
        (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": from_model, "eos_token_id": 2}))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"custom_id": "o", "method": "POST", "url": "/v1/completions",
                               "body": {"prompt": [5, 6, 7, 8], "ignore_eos": True}}) + "\n"
                   + json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}}) + "\n"
                   + json.dumps({"id": "p", "prompt_token_ids": [5, 6, 7, 8], "ignore_eos": True}) + "\n")
    code = cli.main(["run", str(src), "-o", str(out), "--model", str(model), "--max-model-len", "300",
                     "--no-progress", *option])
    assert code == 0, capsys.readouterr().err
    usage = _usage(out)
    chat_prompt, chat_completion = usage["c"]
    assert chat_completion == (300 - chat_prompt if chat_tokens is None else chat_tokens)
    assert (usage["o"][1], usage["p"][1]) == (completion_tokens, plain_tokens)


def test_a_generation_config_folders_max_new_tokens_caps_every_openai_line(tmp_path, capsys, tiny_model_factory):
    """vLLM: where --generation-config names a folder whose file sets max_new_tokens, that is a limit on every
    request of its server (its run-batch too): a line's own max_tokens above it, and a completion's default 16,
    are cut to it. They ran to their own. A plain line (LLM.generate's rule) keeps its own. The context is checked
    against the line's own max_tokens before the cap, as vLLM's server checks it (it ran, cut to the cap)."""
    from batchllm import cli

    model, folder = tmp_path / "model", tmp_path / "folder"
    shutil.copytree(tiny_model_factory("llama"), model)
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5, "eos_token_id": 2}))
    chat = {"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
    lines = [{"custom_id": "completion-default", "url": "/v1/completions", "body": {"prompt": [5, 6, 7]}},
             {"custom_id": "completion-30", "url": "/v1/completions", "body": {"prompt": [5, 6], "max_tokens": 30}},
             {"custom_id": "completion-3", "url": "/v1/completions", "body": {"prompt": [5], "max_tokens": 3}},
             {"custom_id": "chat-default", "url": "/v1/chat/completions", "body": chat},
             {"custom_id": "chat-30", "url": "/v1/chat/completions", "body": {**chat, "max_tokens": 30}},
             {"id": "plain-30", "prompt_token_ids": [5, 6, 7, 8], "max_tokens": 30},
             {"custom_id": "past-the-context", "url": "/v1/completions", "body": {"prompt": [5] * 10,
                                                                                 "max_tokens": 1020}},
             # -1 resolved beside the line's own 40, as vLLM resolves it (beside the cap's 5 it kept 1019 tokens, and
             # the line was refused as past the context)
             {"custom_id": "truncated", "url": "/v1/completions", "body": {"prompt": [5] * 1100, "max_tokens": 40,
                                                                          "truncate_prompt_tokens": -1}}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"method": "POST", **line, **({"body": {**line["body"], "ignore_eos": True}}
                                                                    if "body" in line else {"ignore_eos": True})})
                           + "\n" for line in lines))
    code = cli.main(["run", str(src), "-o", str(out), "--model", str(model), "--generation-config", str(folder),
                     "--no-progress"])
    assert code == 1, capsys.readouterr().err
    assert {name: tokens for name, (_, tokens) in _usage(out).items()} == {
        "completion-default": 5, "completion-30": 5, "completion-3": 3, "chat-default": 5, "chat-30": 5,
        "plain-30": 30, "truncated": 5}
    assert _usage(out)["truncated"][0] == 1024 - 40
    error = json.loads((tmp_path / "out.errors.jsonl").read_text())
    assert error["custom_id"] == "past-the-context" and "1020 for the completion" in error["error"]["message"]


def test_an_output_written_before_the_openai_default_changed_is_not_resumed_as_if_unchanged(tmp_path, capsys,
                                                                                            tiny_model_factory):
    """Its state file lacks the new default, so the resume names it (whatever the file holds: the options are
    checked before the lines are read), and --max-tokens 256, the old default of every line, resumes it."""
    from batchllm import cli

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi", "max_tokens": 2}\n{"id": "b", "prompt": "Hi", "max_tokens": 2}\n')
    args = ["run", str(src), "-o", str(out), "--model", tiny_model_factory("llama"), "--no-progress"]
    assert cli.main(args) == 0
    state_path = tmp_path / "out.jsonl.batchllm-state"
    state = json.loads(state_path.read_text())
    del state["options"]["openai_max_tokens"]
    state_path.write_text(json.dumps(state))
    out.write_text(out.read_text().splitlines()[0] + "\n")  # one line left to answer
    capsys.readouterr()
    assert cli.main(args) == 2
    assert 'unless --max-tokens gives one) (unset) -> "chat: to the context; completions: 16"' in \
        capsys.readouterr().err
    assert cli.main([*args, "--max-tokens", "256"]) == 0, "the old default given resumes it"


def test_an_output_begun_when_completions_took_the_models_max_tokens_resumes_as_it_began(tmp_path, capsys,
                                                                                         tiny_model_factory):
    """Completions lines without max_tokens took the model's max_new_tokens before they took 16 (vLLM's server):
    an output begun then (its state records no rule beside the model's max_tokens) resumes under the old rule,
    and says so; --overwrite starts over under the new one."""
    from batchllm import cli

    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), model)
    (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7, "eos_token_id": 2}))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"custom_id": f"o{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": [5, 6, 7, 8], "ignore_eos": True}} for i in range(2)]
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["run", str(src), "-o", str(out), "--model", str(model), "--max-model-len", "300", "--no-progress"]
    assert cli.main(args) == 0
    assert {u[1] for u in _usage(out).values()} == {16}
    state_path = tmp_path / "out.jsonl.batchllm-state"
    state = json.loads(state_path.read_text())
    del state["options"]["openai_max_tokens"]  # as the earlier version recorded it
    state_path.write_text(json.dumps(state))
    first = out.read_text().splitlines()[0]
    record = json.loads(first)
    record["response"]["body"]["usage"]["completion_tokens"] = 7  # (as the earlier version answered it)
    out.write_text(json.dumps(record) + "\n")
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "take the model's max_tokens: its remaining lines do too" in capsys.readouterr().err
    assert sorted(u[1] for u in _usage(out).values()) == [7, 7]
    assert cli.main([*args, "--overwrite"]) == 0
    assert {u[1] for u in _usage(out).values()} == {16}


def test_the_models_repetition_penalty_can_be_overridden_on_the_command_line(tmp_path, capsys, tiny_model_factory):
    """run took repetition_penalty from the model's file with no flag to change it (its note said the command
    line's options override the model's defaults)."""
    from batchllm import cli

    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), model)
    (model / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.05, "eos_token_id": 2}))
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi", "max_tokens": 2}\n')
    for flag, expected in (([], 1.05), (["--repetition-penalty", "1.0"], 1.0)):
        out = tmp_path / f"out{len(flag)}.jsonl"
        assert cli.main(["run", str(src), "-o", str(out), "--model", str(model), "--no-progress", *flag]) == 0
        options = json.loads((tmp_path / f"{out.name}.batchllm-state").read_text())["options"]
        assert options["repetition_penalty"] == expected
        assert ("repetition_penalty 1.05" in capsys.readouterr().err) == (not flag), "the note names what applies"


def test_an_output_begun_when_completions_ran_to_the_context_resumes_under_that_rule(tmp_path, capsys,
                                                                                    tiny_model_factory):
    """An output begun before /v1/completions lines without max_tokens took 16 tokens recorded "to the context":
    its remaining lines run so too, saying why, rather than answers mixing two rules (or the resume being
    refused); --overwrite starts over under the new rule."""
    from batchllm import cli

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"custom_id": c, "method": "POST", "url": "/v1/completions",
                                       "body": {"prompt": [5, 6, 7, 8], "ignore_eos": True}}) + "\n" for c in "ab"))
    args = ["run", str(src), "-o", str(out), "--model", tiny_model_factory("llama"), "--max-model-len", "64",
            "--no-progress"]
    assert cli.main(args) == 0
    assert _usage(out) == {"a": (4, 16), "b": (4, 16)}
    state_path = tmp_path / "out.jsonl.batchllm-state"
    state = json.loads(state_path.read_text())
    state["options"]["openai_max_tokens"] = "to the context"  # as the earlier version wrote it
    state_path.write_text(json.dumps(state))
    out.write_text(out.read_text().splitlines()[0] + "\n")  # one line left to answer
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "begun by an earlier version" in capsys.readouterr().err
    assert sorted(_usage(out).values())[-1] == (4, 60), "the remaining line ran to the context"
    assert cli.main([*args, "--overwrite"]) == 0
    assert _usage(out) == {"a": (4, 16), "b": (4, 16)}


def test_prompt_processor_checks_end_requests_on_the_generation_configs_eos_ids(tmp_path, tiny_model_factory):
    """`plan` and Ray's CPU stage check lines with `prompt_processor_for`, which took the tokenizer's EOS alone: a
    line allowing only generation_config.json's other EOS id with min_tokens passed there (its answer then took a
    token it never allowed) where `run` refused it. Now the ids are the engine's, and --generation-config vllm
    leaves the file's out, as it does for the engine."""
    from batchllm.inputs import prompt_processor_for
    from batchllm.sampling_params import SamplingParams

    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), model)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    prompts = prompt_processor_for(str(model))
    tokenizer_eos = prompts.tokenizer.eos_token_id
    assert set(prompts.eos_token_ids) == {2, 7, tokenizer_eos}
    assert set(prompt_processor_for(str(model), generation_config="vllm").eos_token_ids) >= {tokenizer_eos}
    params = SamplingParams(allowed_token_ids=[7], min_tokens=2)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        params.check_for_model(prompts.vocab_size, prompts.tokenizer, prompts.grammars, prompts.max_logprobs,
                               prompts.eos_token_ids)
