"""Engine options are declared once (config.py) and derived: every field is an `LLM` keyword and a
CLI flag of `run` and `bench` with the same default; unknown keywords are named; vLLM's keywords
either work or are refused by name. No model is loaded here."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
from pathlib import Path

import pytest

from batchllm.cli import build_parser
from batchllm.config import EngineConfig
from batchllm.io.ingest import LineServing
from batchllm.llm import LLM
from batchllm.options import (
    TRI_STATE,
    add_engine_arguments,
    dashed_flag_names,
    engine_config,
    engine_kwargs_from_args,
    engine_options,
)


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for section in dataclasses.fields(EngineConfig)
            for f in dataclasses.fields(section.default_factory())}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return parser.parse_args(list(argv))


def test_every_config_field_is_an_option_with_its_default_and_help():
    fields = config_fields()
    assert set(engine_options()) == set(fields)
    assert {"data_parallel_size", "tensor_parallel_size", "prefix_sharing", "block_size"} <= set(fields)
    for name, f in fields.items():
        assert f.metadata["help"], name
        assert engine_options()[name].default == f.default


def test_no_arguments_give_the_default_config():
    assert engine_config(**engine_kwargs_from_args(parse())) == EngineConfig()
    assert engine_config() == EngineConfig()


@pytest.mark.parametrize("command", ["run", "bench"])
def test_every_option_is_a_flag_of_run_and_bench_with_the_declared_default(command):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    dests = {}
    for action in parser._actions:  # the first flag of a dest is the option (--no-async-scheduling follows it)
        dests.setdefault(action.dest, action)
    skipped = {"run": {"seed"}, "bench": {"skip_tokenizer_init"}}[command]  # seeded / fixed by the command
    for name, option in engine_options().items():
        if name in skipped:
            continue
        action = dests[name]
        assert action.option_strings[0] == "--" + name.replace("_", "-")
        default = TRI_STATE[action.default] if option.type is bool and option.optional else action.default
        assert default == option.default, name  # bench measures what run gets
    for action in parser._actions:
        if action.option_strings and action.dest != "help" and action.default is not argparse.SUPPRESS:
            # every option shows its default, once (a --no-x spelling of an option shows it at --x)
            shown = parser.formatter_class("x")._get_help_string(action)
            stated = shown.count("(default:")
            assert action.help and (stated == 1 or stated == 0 and "%(default)" in shown), (action.dest, shown)


def test_a_default_stated_in_words_is_not_repeated_in_the_help(capsys):
    """`run --help` showed "--errors-file ... (default: the output's name with .errors.jsonl, ...) ...
    (default: None)": argparse appended the None default to a help that states it in words."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--errors-file ERRORS_FILE", "--ray-address RAY_ADDRESS"):
        entry = text.split(option + " ")[-1].split(" --", 1)[0]  # its help (the usage line has it in brackets)
        assert entry.count("(default:") == 1 and "(default: None)" not in entry, entry


def test_flags_reach_the_config_with_the_old_spellings():
    args = parse("--no-prefix-sharing", "--async-scheduling", "off", "--enforce-eager", "--block-size", "4",
                 "--max-num-seqs", "8", "--tensor-parallel-size", "2", "--data-parallel-size", "3",
                 "--kv-cache-memory-gib", "0.5", "--plan-mode", "single")
    config = engine_config(**engine_kwargs_from_args(args))
    assert config.sharing == dataclasses.replace(EngineConfig().sharing, prefix_sharing=False, plan_mode="single")
    assert config.scheduler.async_scheduling is False and config.scheduler.max_num_seqs == 8
    assert config.model.enforce_eager and config.cache.block_size == 4 and config.cache.kv_cache_memory_gib == 0.5
    assert (config.parallel.tensor_parallel_size, config.parallel.data_parallel_size) == (2, 3)
    assert engine_config(**engine_kwargs_from_args(parse("--async-scheduling", "on"))).scheduler.async_scheduling


def test_choices_come_from_the_declarations():
    with pytest.raises(SystemExit):
        parse("--plan-mode", "triple")
    with pytest.raises(ValueError, match="plan_mode must be one of"):
        engine_config(plan_mode="triple")
    with pytest.raises(ValueError, match="dtype must be one of"):
        engine_config(dtype="int3")


def test_llm_takes_exactly_the_options():
    signature = inspect.signature(LLM.__init__)
    assert list(signature.parameters) == ["self", "model", "kwargs"]
    assert signature.parameters["model"].default is None


def test_an_unknown_keyword_is_named_with_the_closest_options():
    with pytest.raises(TypeError, match=r"unknown engine option 'max_num_batched_token'.*'max_num_batched_tokens'"):
        engine_config(max_num_batched_token=64)
    with pytest.raises(TypeError, match="speculative_config=.* is not supported: speculative decoding"):
        LLM(speculative_config={"method": "ngram"})  # refused before anything is loaded
    with pytest.raises(TypeError, match="unknown engine option 'pooling_config'"):
        LLM(pooling_config={})
    # (it pointed at `run --help`, which lists --disable-log-requests: a flag there, no keyword, as in vLLM)
    with pytest.raises(TypeError, match="'disable_log_requests': a flag of vLLM's commands .* no LLM keyword"):
        engine_config(disable_log_requests=True)


def test_vllm_keywords_that_change_nothing_here_are_taken():
    """vLLM scripts pass these to LLM(); each was "unknown engine option"."""
    assert engine_config(disable_log_stats=True, swap_space=4, disable_custom_all_reduce=True,
                         tokenizer_mode="auto") == EngineConfig()
    with pytest.raises(ValueError, match="tokenizer_mode='mistral' is not supported"):
        LLM(tokenizer_mode="mistral")


def test_vllm_keywords_work_or_are_refused_by_name():
    config = engine_config(tensor_parallel_size=2, enable_prefix_caching=False, trust_remote_code=True, seed=7,
                           quantization=None)
    assert config.parallel.tensor_parallel_size == 2 and config.sharing.prefix_sharing is False
    assert config.model.trust_remote_code and config.model.seed == 7
    with pytest.raises(ValueError, match=r"must be one of \('fp8', 'compressed-tensors'\) or None, got 'awq'"):
        LLM(quantization="awq")
    with pytest.raises(TypeError, match="'enable_prefix_caching' and 'prefix_sharing' are the same option"):
        engine_config(enable_prefix_caching=True, prefix_sharing=False)


def test_vllm_command_line_spellings_are_taken():
    """vLLM's run-batch command lines use these; each was "unrecognized arguments" or an invalid choice."""
    config = engine_config(**engine_kwargs_from_args(parse(
        "--no-enable-prefix-caching", "--async-scheduling", "--max-model-len", "4k", "--max-num-batched-tokens",
        "16K", "--dtype", "half")))
    assert config.sharing.prefix_sharing is False and config.scheduler.async_scheduling is True
    assert config.model.max_model_len == 4000 and config.scheduler.max_num_batched_tokens == 16384
    assert config.model.dtype == "float16" and engine_config(dtype="float").model.dtype == "float32"
    assert engine_config(**engine_kwargs_from_args(parse("--enable-prefix-caching"))).sharing.prefix_sharing
    assert engine_config(**engine_kwargs_from_args(parse("--max-model-len", "16.1k"))).model.max_model_len == 16100
    for auto in ("auto", "-1"):  # (vLLM's -1 reached `run`'s model check as a length: exit 3 from torch.arange)
        assert parse("--max-model-len", auto).max_model_len is None
    assert parse("--seed", "-1").seed == -1, "only the context's -1 means automatic"
    for bad in ("4x", "1.5k7", "1.5K", "1e3k"):  # (vLLM refuses a fraction of a binary suffix too)
        with pytest.raises(SystemExit):
            parse("--max-model-len", bad)
    args = build_parser().parse_args(["run", "in.jsonl", "-o", "o.jsonl", "--disable-log-stats",
                                      "--disable-log-requests", "--swap-space", "4", "--tokenizer-mode", "auto",
                                      "--disable-custom-all-reduce"])
    for no_op in ("disable_log_stats", "swap_space", "tokenizer_mode", "disable_custom_all_reduce"):
        assert no_op not in engine_kwargs_from_args(args), "a no-op, not an engine option"
    from batchllm.cli import results_options

    recorded = [results_options(build_parser().parse_args(["run", "i", "-o", "o", "--dtype", dtype]), {})["dtype"]
                for dtype in ("half", "float16")]
    assert recorded == ["float16", "float16"], "a resume under the other name of the dtype is not refused"
    named = results_options(build_parser().parse_args(["run", "i", "-o", "o", "--served-model-name", "a", "b",
                                                       "--response-role", "bot"]), {})
    assert (named["served_model_name"], named["response_role"]) == (["a", "b"], "bot"), (
        "responses name the model and role: a resume under other names would mix two namings in one output")
    plain = results_options(build_parser().parse_args(["run", "i", "-o", "o"]), {})
    assert (plain["served_model_name"], plain["response_role"]) == (None, None), (
        "the defaults recorded as unset, as by versions without these options, whose outputs still resume")
    assert plain["default_chat_template_kwargs"] is None
    templated = build_parser().parse_args(["run", "i", "-o", "o", "--default-chat-template-kwargs",
                                           '{"enable_thinking": false}'])
    assert results_options(templated, {})["default_chat_template_kwargs"] == {"enable_thinking": False}, (
        "the chat lines' template keywords change their prompts: a resume under others would mix two")
    empty = build_parser().parse_args(["run", "i", "-o", "o", "--default-chat-template-kwargs", "{}"])
    assert results_options(empty, {})["default_chat_template_kwargs"] is None
    by_id = build_parser().parse_args(["run", "i", "-o", "o", "--return-tokens-as-token-ids"])
    assert (results_options(by_id, {})["return_tokens_as_token_ids"], plain["return_tokens_as_token_ids"]) == (
        True, None), "logprobs named by id or by text: a resume under the other would mix the two in one output"


@pytest.mark.parametrize("value, problem", [("enable_thinking", "not JSON"), ("[1]", "not a JSON object"),
                                            ('{"chat_template": "{{ messages }}"}',
                                             "must not hold chat_template")])
def test_default_chat_template_kwargs_must_be_a_json_object(value, problem, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "i", "-o", "o", "--default-chat-template-kwargs", value])
    err = capsys.readouterr().err
    assert "--default-chat-template-kwargs" in err and problem in err, err


@pytest.mark.parametrize("words, expected", [
    (["--async-scheduling", "in.jsonl", "-o", "o.jsonl"], True),  # was "invalid choice: 'in.jsonl'"
    (["in.jsonl", "-o", "o.jsonl", "--async-scheduling"], True),
    (["in.jsonl", "--async-scheduling", "--enforce-eager", "-o", "o.jsonl"], True),
    (["in.jsonl", "-o", "o.jsonl", "--async-scheduling", "off"], False),
    (["--no-async-scheduling", "in.jsonl", "-o", "o.jsonl"], False),
    (["in.jsonl", "-o", "o.jsonl", "--async-scheduling", "auto"], None),
])
def test_a_bare_optional_bool_flag_does_not_take_the_next_word(words, expected):
    from batchllm.options import bare_flags_as_on

    args = build_parser().parse_args(bare_flags_as_on(["run", *words]))
    assert args.input is not None and str(args.input) == "in.jsonl"
    assert engine_config(**engine_kwargs_from_args(args)).scheduler.async_scheduling is expected
    assert bare_flags_as_on(["run", "x", "--", "--async-scheduling"])[-1] == "--async-scheduling", "after --: a word"


def test_an_abbreviated_optional_bool_flag_does_not_take_the_next_word_either():
    """argparse takes abbreviations (`--async`), which took the input file as the flag's value."""
    from batchllm.cli import _command_flags
    from batchllm.options import bare_flags_as_on

    parser = build_parser()
    words = ["run", "--async", "in.jsonl", "-o", "o.jsonl"]
    args = parser.parse_args(bare_flags_as_on(words, _command_flags(parser, words)))
    assert str(args.input) == "in.jsonl" and args.async_scheduling == "on"
    ambiguous = ["run", "--enable", "in.jsonl"]  # (--enable-prefix-caching, --enable-metrics, ...): argparse says so
    assert bare_flags_as_on(ambiguous, _command_flags(parser, ambiguous)) == ambiguous
    planned = ["plan", "--async", "in.jsonl"]  # plan has no --async-scheduling: left for argparse to refuse as typed
    assert bare_flags_as_on(planned, _command_flags(parser, planned)) == planned


def test_flags_spelled_with_underscores_are_taken_as_vllm_takes_them():
    """`--max_model_len 4k` (vLLM's parser reads either spelling) was refused as an unrecognized argument."""
    from batchllm.options import bare_flags_as_on, dashed_flag_names

    words = ["run", "in_put.jsonl", "-o", "out_put.jsonl", "--max_model_len", "4k", "--kv_cache_dtype=fp8",
             "--enforce_eager", "--async_scheduling", "--stop", "a_b"]
    args = build_parser().parse_args(bare_flags_as_on(dashed_flag_names(words)))
    assert (str(args.input), str(args.output), args.stop) == ("in_put.jsonl", "out_put.jsonl", ["a_b"]), "values kept"
    config = engine_config(**engine_kwargs_from_args(args))
    assert (config.model.max_model_len, config.cache.kv_cache_dtype) == (4000, "fp8")
    assert config.scheduler.async_scheduling is True and config.model.enforce_eager is True
    assert dashed_flag_names(["run", "--", "--x_y"]) == ["run", "--", "--x_y"], "after --: words, kept as given"


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_model_len="4k"), "engine option 'max_model_len' must be an integer or None, got '4k'"),
    (dict(block_size=True), "engine option 'block_size' must be an integer or None, got True"),
    (dict(gpu_memory_utilization="0.9"), "engine option 'gpu_memory_utilization' must be a number, got '0.9'"),
    (dict(enforce_eager="yes"), "engine option 'enforce_eager' must be True or False, got 'yes'"),
    (dict(enable_prefix_caching=1), "engine option 'enable_prefix_caching' must be True or False, got 1"),
])
def test_a_value_of_the_wrong_type_is_refused_by_name(kwargs, message):
    """It reached the engine, which failed far from the cause (max_model_len="4k": comparing str and int)."""
    with pytest.raises(TypeError, match=message):
        engine_config(**kwargs)
    assert engine_config(gpu_memory_utilization=1, max_model_len=None).cache.gpu_memory_utilization == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(device="tpu"), "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (dict(device="cuda:x"), "device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (dict(seed=2**64), r"seed must be in \[-2\*\*63, 2\*\*64 - 1\], got 18446744073709551616"),
    (dict(seed=-(2**63) - 1), "seed must be in"),
])
def test_a_device_or_seed_out_of_reach_is_refused_when_the_config_is_built(kwargs, message):
    """Each failed in torch (a device string at the engine's start, exit 3; the seed after the weights had loaded),
    naming no option."""
    with pytest.raises(ValueError, match=message):
        engine_config(**kwargs)
    assert engine_config(device="cuda:1", seed=2**64 - 1).model.device == "cuda:1"


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_size=0), "block_size must be >= 1, got 0"),
    (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be in \(0, 1\], got 1.5"),
    (dict(kv_cache_memory_gib=0), "kv_cache_memory_gib must be > 0, got 0"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be >= 1, got 0"),
    (dict(max_model_len=1), "max_model_len must be >= 2, got 1"),
])
def test_declared_bounds_are_checked_and_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine_config(**kwargs)
    # None where None is the default
    assert engine_config(max_num_seqs=None, kv_cache_memory_gib=None) == EngineConfig()


def test_the_step_budget_is_chosen_from_the_device_unless_set(default_model_dir):
    from batchllm.engine import DEFAULT_STEP_TOKENS, default_step_tokens, resolve_model

    auto = resolve_model(engine_config(model=str(default_model_dir), device="cpu"))
    assert auto.scheduler.max_num_batched_tokens == DEFAULT_STEP_TOKENS["cpu"] == 2048
    assert default_step_tokens("cuda", 141 * 2**30) == DEFAULT_STEP_TOKENS["cuda"] == 16384  # H200: measured
    assert default_step_tokens("cuda", 24 * 2**30) == 8192  # a small GPU keeps room for a step's activations
    assert default_step_tokens("cpu") == 2048
    chosen = resolve_model(engine_config(model=str(default_model_dir), device="cpu", max_num_batched_tokens=96))
    assert chosen.scheduler.max_num_batched_tokens == 96
    with pytest.raises(ValueError, match="chunked prefill off"):  # checked against the resolved budget
        resolve_model(engine_config(model=str(default_model_dir), device="cpu", enable_chunked_prefill=False,
                                    max_model_len=4096))


def test_llm_and_run_read_the_model_directory_once(tmp_path, capsys, monkeypatch, tiny_model_factory):
    """The prompt side and the engine start from one `ModelSource`: an `LLM`, and a whole `batchllm run`
    (its early check of --model, the engine count, the FrontEnd, the engine's facts), read the model's
    config.json once (they read it 2 and 5 times, and warned of a context capped at the sliding window
    as often as they resolved it)."""
    from pathlib import Path

    import batchllm.models.spec
    from batchllm import cli

    model = tiny_model_factory("llama")
    reads = []
    read = batchllm.models.spec._read_config  # every reader of a spec comes through here
    monkeypatch.setattr(batchllm.models.spec, "_read_config", lambda d: reads.append(d) or read(d))
    llm = LLM(model, device="cpu", max_model_len=64)
    assert reads == [Path(model)] and llm.max_model_len == 64
    llm.shutdown()
    reads.clear()
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi", "max_tokens": 2}\n')
    code = cli.main(["run", str(src), "-o", str(out), "--model", model, "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert reads == [Path(model)]


def test_run_refuses_a_context_the_model_cannot_hold_before_writing_anything(tmp_path, capsys, tiny_model_factory):
    from batchllm import cli

    model = tiny_model_factory("llama")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi", "max_tokens": 2}\n')
    code = cli.main(["run", str(src), "-o", str(out), "--model", model, "--max-model-len", "100000", "--no-progress"])
    assert code == 2 and "max_model_len 100000 exceeds what the model supports (1024)" in capsys.readouterr().err
    assert not out.exists()


def test_facts_and_sources_handed_on_must_be_the_configs(default_model_dir):
    from batchllm.engine import build_engine, resolve_model
    from batchllm.inputs import read_model_source

    config = engine_config(model=str(default_model_dir), device="cpu", max_model_len=128)
    with pytest.raises(ValueError, match="read for a context of 64 tokens, the config asks for 128"):
        resolve_model(config, source=read_model_source(str(default_model_dir), 64))
    facts = resolve_model(config, source=read_model_source(str(default_model_dir), 128))
    assert facts.max_model_len == 128
    with pytest.raises(ValueError, match="a device or resolved facts"):
        build_engine(config, "cpu", facts)


def test_run_takes_vllms_response_naming_options():
    from batchllm.cli import response_shape

    args = build_parser().parse_args(["run", "in.jsonl", "-o", "o", "--served-model-name", "smol", "smol-2",
                                      "--response-role", "bot", "--model", "/m/SmolLM2"])
    assert tuple(response_shape(args, "SmolLM2"))[:5] == ("/m/SmolLM2", ("smol", "smol-2"), "bot", LineServing(),
                                                          None)
    plain = build_parser().parse_args(["run", "in.jsonl", "-o", "o"])
    assert tuple(response_shape(plain, "SmolLM2-135M-Instruct"))[:5] == ("SmolLM2-135M-Instruct", (), "assistant",
                                                                         LineServing(), None)
    qwen3 = build_parser().parse_args(["run", "in.jsonl", "-o", "o", "--reasoning-parser", "qwen3"])
    assert response_shape(qwen3, "m").serving.reasoning_parser == "qwen3"


def test_run_serves_lines_and_writes_records_from_one_reading_of_its_options():
    """`line_serving` is the one place `run`'s per-line serving options are read: the lines are prepared and the
    records written (`response_shape`) from the same value, on `run` and `run --ray` alike."""
    from batchllm.cli import line_serving, response_shape

    args = build_parser().parse_args([
        "run", "in.jsonl", "-o", "o", "--default-chat-template-kwargs", '{"enable_thinking": false}',
        "--exclude-tools-when-tool-choice-none", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--reasoning-parser", "qwen3"])
    serving = line_serving(args)
    assert serving == LineServing({"enable_thinking": False}, True, "hermes", "qwen3")
    assert response_shape(args, "m").serving == serving


@pytest.mark.parametrize("words, names, input_path", [
    (["--served-model-name", "smol", "in.jsonl", "-o", "o"], ["smol"], "in.jsonl"),  # was: no input file
    (["--served-model-name", "a", "b", "in.jsonl", "-o", "o"], ["a", "b"], "in.jsonl"),
    (["in.jsonl", "--served-model-name", "a", "b", "-o", "o"], ["a", "b"], "in.jsonl"),
    (["-i", "in.jsonl", "--served-model-name", "a", "b"], ["a", "b"], "in.jsonl"),
])
def test_served_model_name_leaves_a_following_input_path_the_input(words, names, input_path, monkeypatch):
    """--served-model-name takes one or more names, so `--served-model-name smol in.jsonl` named the model
    twice and the job failed for want of an input; without another input its last word is the input."""
    import batchllm.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "run_command", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["run", *words, *([] if "-o" in words else ["-o", "o"])]) == 0
    assert seen["served_model_name"] == names and str(seen["input"]) == input_path


def test_bench_and_engine_args_take_served_model_name_as_vllm_scripts_pass_it():
    """vLLM's EngineArgs has --served-model-name (its bench and its example scripts pass it); `bench` and
    `EngineArgs.add_cli_args` refused it as an unrecognized argument, as only `run` (where it names responses) had
    the flag. Both now take one or more names and drop them: the engine built is the same."""
    from batchllm.engine_args import EngineArgs

    args = build_parser().parse_args(["bench", "--served-model-name", "smol", "smol-2"])
    assert args.served_model_name == ["smol", "smol-2"]
    assert engine_config(**engine_kwargs_from_args(args)) == engine_config()
    parsed = EngineArgs.add_cli_args(argparse.ArgumentParser()).parse_args(["--served-model-name", "smol"])
    engine_args = EngineArgs.from_cli_args(parsed)
    assert parsed.served_model_name == ["smol"] and engine_args == EngineArgs()


def test_served_names_without_an_input_file_are_names(capsys):
    """Only a word that names a file (it exists, or ends in .jsonl) is taken for the forgotten input."""
    from batchllm.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "-o", "o.jsonl", "--served-model-name", "a", "b"])
    assert exit_.value.code == 2 and "the input file is required" in capsys.readouterr().err


def test_run_batch_is_run_as_vllm_spells_it(capsys):
    """`batchllm run-batch -i in.jsonl -o out.jsonl`, as a vLLM user types `vllm run-batch`, was "invalid choice:
    'run-batch'". It is `run` under another name: the same options, and everything after the parse sees `run`."""
    parser = build_parser()
    args = parser.parse_args(["run-batch", "-i", "in.jsonl", "-o", "o.jsonl", "-tp", "2", "--max-tokens", "7"])
    assert args.command == "run"
    assert (str(args.input_option), str(args.output), args.max_tokens) == ("in.jsonl", "o.jsonl", 7)
    assert vars(args) == vars(parser.parse_args(["run", "-i", "in.jsonl", "-o", "o.jsonl", "-tp", "2",
                                                 "--max-tokens", "7"]))
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sub.choices["run-batch"] is sub.choices["run"], "one definition"
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "run (run-batch)" in capsys.readouterr().out


def test_vllm_run_batch_spellings_are_taken(capsys):
    """vLLM's run-batch takes --input-file/--output-file, -tp/-dp/-q and flags of its own server; each was an
    unrecognized argument, some with a wrong hint (--max-log-len: "did you mean --max-model-len?")."""
    from batchllm.cli import main

    args = build_parser().parse_args(["run", "--input-file", "in.jsonl", "--output-file", "o.jsonl", "-tp", "2",
                                      "-dp", "1", "-q", "fp8", "--output-tmp-dir", "/tmp", "--enable-metrics", "--url",
                                      "0.0.0.0", "--port", "8001", "--enable-prompt-tokens-details",
                                      "--enable-force-include-usage", "--max-log-len", "100", "--enable-log-requests",
                                      # (vLLM 0.26's frontend flags of run-batch, each an unrecognized argument)
                                      "--host", "0.0.0.0", "--log-error-stack", "--enable-log-outputs",
                                      "--enable-log-deltas", "--enable-per-request-metrics",
                                      "--enable-server-load-tracking", "--enable-tokenizer-info-endpoint",
                                      "--chat-template-content-format", "auto",
                                      "--no-enable-log-deltas", "--no-log-error-stack", "--no-enable-metrics"])
    assert (str(args.input_option), str(args.output)) == ("in.jsonl", "o.jsonl")
    config = engine_config(**engine_kwargs_from_args(args))
    assert (config.parallel.tensor_parallel_size, config.model.quantization) == (2, "fp8")
    with pytest.raises(TypeError, match="unknown engine option 'enable_metrics'"):
        engine_config(enable_metrics=True)  # run-batch's flags are not LLM keywords
    with pytest.raises(SystemExit):
        main(["run", "in.jsonl", "-o", "o.jsonl", "-pp", "2"])
    assert "argument --pipeline-parallel-size/-pp: 2 is not supported: pipeline parallelism" in capsys.readouterr().err
    for flags, said in ((["--tool-server", "localhost:1"], "no tool server"),
                        (["--chat-template-content-format", "openai"],
                         "'openai' is not supported (the content format is detected from the chat template")):
        with pytest.raises(SystemExit):
            main(["run-batch", "-i", "in.jsonl", "-o", "o.jsonl", *flags])
        assert said in capsys.readouterr().err


@pytest.mark.parametrize("command", [["run", "in.jsonl", "-o", "o.jsonl"], ["bench"]])
def test_vllm_flags_without_a_counterpart_are_taken_at_the_values_llm_takes(command, capsys):
    """`run -pp 1` (and --distributed-executor-backend mp, --task generate, --cpu-offload-gb 0 ...: vLLM's
    defaults, as a vLLM user's scripts pass them) was refused as "unrecognized arguments" with the reason, though
    LLM(pipeline_parallel_size=1) and EngineArgs' parser take it. `run` and `bench` take such a flag at a value
    LLM takes, read as vLLM's command line reads it, and refuse any other with exit status 2 naming the flag, the
    value and what to do instead."""
    from batchllm.cli import main
    from batchllm.options import not_taken_accepts

    taken = [["-pp", "1"], ["--pipeline-parallel-size", "1"], ["--distributed-executor-backend", "mp"],
             ["--task", "generate"], ["--scheduling-policy", "fcfs"], ["--cpu-offload-gb", "0.0"],
             ["--compilation-config", "{}"], ["--hf-overrides", "{}"], ["--revision", "None"], ["--no-enable-lora"],
             ["-O2"], ["--scheduling_policy=fcfs"], ["--structured-outputs-config", '{"backend": "xgrammar"}']]
    for words in taken:
        args = build_parser().parse_args(dashed_flag_names([*command, *words]))
        name = words[0].split("=")[0].lstrip("-").replace("-", "_")
        name = {"pp": "pipeline_parallel_size", "O2": "optimization_level", "no_enable_lora": "enable_lora"}.get(
            name, name)
        assert not_taken_accepts(name, getattr(args, name)), words
        assert engine_config(**engine_kwargs_from_args(args)) == engine_config(), words  # (taken and dropped)
    args = build_parser().parse_args([*command, "-pp", "1", "--cpu-offload-gb", "0.0", "--compilation-config", "{}"])
    assert (args.pipeline_parallel_size, args.cpu_offload_gb, args.compilation_config) == (1, 0.0, {})
    assert type(args.cpu_offload_gb) is float and type(args.pipeline_parallel_size) is int
    for words, shown in ((["-pp", "2"], "argument --pipeline-parallel-size/-pp: 2 is not supported: pipeline "
                                        "parallelism is not supported; use --tensor-parallel-size"),
                         (["--task", "embed"], "argument --task: 'embed' is not supported: the engine generates text"),
                         (["--cpu-offload-gb", "4"], "--cpu-offload-gb: 4.0 is not supported: the weights stay"),
                         (["--compilation-config", '{"level": 0}'], "argument --compilation-config: {'level': 0} is "
                                                                     "not supported: the kernels are Triton's"),
                         (["--distributed-executor-backend", "ray"], "'ray' is not supported: tensor and data "
                                                                     "parallelism run in processes"),
                         (["--enable-lora"], "argument --enable-lora/--no-enable-lora: True is not supported: LoRA")):
        with pytest.raises(SystemExit) as exit_:
            main([*command, *words])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and shown in err and "unrecognized" not in err, err
    with pytest.raises(SystemExit):
        main([command[0], "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "vLLM options not taken here: vLLM's flags for what has no counterpart here are taken at the values" in (
        shown) and "--distributed-executor-backend mp" in shown and "--speculative-config" not in shown, (
        "one paragraph for them all, not ~200 flags")


def test_an_unknown_flag_is_refused_by_the_subcommand_naming_what_it_may_have_meant(capsys):
    from batchllm.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["plan", "in.jsonl", "--tempratur", "0", "--revision=main", "--zzz"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "batchllm plan: error: unrecognized arguments: --tempratur 0 --revision=main" in err
    assert "--tempratur: did you mean --temperature?" not in err, "plan has no --temperature"
    assert "--revision: models are read from" in err, "plan takes no engine flag of vLLM's: what it means is said"
    with pytest.raises(SystemExit) as exit_:
        main(["run", "in.jsonl", "-o", "o.jsonl", "--temprature", "0", "--zzz"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "batchllm run: error: unrecognized arguments: --temprature 0" in err
    assert "--temprature: did you mean --temperature?" in err
    assert "--zzz:" not in err, "no hint where nothing is close"
    with pytest.raises(SystemExit):  # (run and plan take vLLM's tool-calling flags: `bench` names the commands that do)
        main(["bench", "--tool-call-parser", "hermes"])
    assert "--tool-call-parser: only `run` (run-batch) and `plan` take it" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # vLLM's bench throughput flags were "unrecognized" without a word
        main(["bench", "--num-prompts", "10", "--dataset-path", "p.jsonl", "--output-len", "8"])
    err = capsys.readouterr().err
    assert "--num-prompts: vLLM bench's count of prompts is --requests here" in err
    assert "--dataset-path: a file of prompts is --prompts-file" in err and "--output-len: the output's length" in err


def test_vllms_tool_calling_flags_migrate_to_run_saying_what_they_change(capsys, tmp_path):
    """`run-batch ... --tool-call-parser hermes` (vLLM 0.26 serves "required" and named tool_choice only with a
    parser) exited 2 saying tool calls were not parsed here, which forced choices now are: the flags are taken,
    a line says a forced choice's answer is read as JSON and "auto" lines still fail; vLLM's rules stand
    (--enable-auto-tool-choice needs --tool-call-parser). --exclude-tools-when-tool-choice-none, refused before, is
    taken (it changes "none" lines' prompts: `test_tool_calls`), and recorded with the options a resume must keep,
    off as unset (as outputs written before it existed recorded it)."""
    from batchllm.cli import main

    missing = str(tmp_path / "missing.jsonl")
    assert main(["run-batch", "-i", missing, "-o", str(tmp_path / "o.jsonl"), "--tool-call-parser", "hermes",
                 "--tool-parser-plugin", "p.py"]) == 2  # (no input: not the flags)
    err = capsys.readouterr().err
    assert "--tool-call-parser, --tool-parser-plugin: taken and not used" in err
    assert ("a forced tool_choice's answer (\"required\" or a named function) is constrained to JSON and read as "
            'such, whatever the model\'s own call syntax; "auto" lines fail, each alone, without '
            "--enable-auto-tool-choice") in err
    assert "cannot read input file" in err and "unrecognized" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["run", "-i", missing, "-o", "o.jsonl", "--enable-auto-tool-choice"])
    assert exit_.value.code == 2
    assert "--enable-auto-tool-choice requires --tool-call-parser" in capsys.readouterr().err
    from batchllm.cli import build_parser, results_options

    for words in (["run", "i", "-o", "o"], ["run-batch", "-i", "i", "-o", "o"], ["plan", "i"]):
        args = build_parser().parse_args([*words, "--exclude-tools-when-tool-choice-none"])
        assert args.exclude_tools_when_tool_choice_none is True
    recorded = [results_options(build_parser().parse_args(["run", "i", "-o", "o", *flag]), {})
                ["exclude_tools_when_tool_choice_none"] for flag in ([], ["--exclude-tools-when-tool-choice-none"])]
    assert recorded == [None, True]


def test_vllm_module_paths_and_python_dash_m_work():
    """Ported vLLM code imports `RequestOutput` from `.outputs`, and `python -m batchllm` is how a job runs
    where the console script is not on PATH: both failed."""
    import subprocess
    import sys

    import batchllm
    from batchllm import outputs

    assert (outputs.RequestOutput, outputs.CompletionOutput, outputs.Logprob) == (
        batchllm.RequestOutput, batchllm.CompletionOutput, batchllm.Logprob)
    done = subprocess.run([sys.executable, "-m", "batchllm", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("batchllm "), done
    missing = subprocess.run([sys.executable, "-m", "batchllm", "plan", "/nonexistent/in.jsonl"], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "in.jsonl" in missing.stderr, "main's exit status is the process's"


def test_vllm_options_without_a_counterpart_say_what_to_do_instead():
    """LLM(revision=...) said only "unknown engine option"; the command line named what to do instead."""
    from batchllm.options import engine_config

    for key, value, instead in (("revision", "v1.0", "give the model as the directory of that revision"),
                                ("pipeline_parallel_size", 2, "use tensor_parallel_size and data_parallel_size"),
                                ("download_dir", "/d", "nothing is downloaded")):
        with pytest.raises(TypeError, match=f"{key}={value!r} is not supported: .*{instead}"):
            engine_config(**{key: value})
    # vLLM's defaults ask for what runs here: ported code passing them explicitly is not refused
    assert engine_config(pipeline_parallel_size=1, revision=None, enable_lora=False, hf_overrides={},
                         distributed_executor_backend="mp") == engine_config()
    # vLLM's data-parallel example passes these (they were unknown engine options)
    assert engine_config(enable_expert_parallel=False, data_parallel_backend="mp") == engine_config()
    with pytest.raises(TypeError, match="data_parallel_backend='ray' is not supported: data parallelism runs"):
        engine_config(data_parallel_backend="ray")
    with pytest.raises(TypeError, match="enable_lora=1 is not supported"):
        engine_config(enable_lora=1)  # (True's twin is not False's: the value's type counts)


def test_more_vllm_keywords_are_taken_at_their_defaults_or_without_effect():
    """Ported scripts pass these (task="generate" in most vLLM 0.6-0.10 examples); each was an "unknown engine
    option"."""
    from batchllm.options import engine_config

    assert engine_config(task="generate", runner="auto", cpu_offload_gb=0, logprobs_mode="raw_logprobs",
                         limit_mm_per_prompt=None, tokenizer_revision=None, max_seq_len_to_capture=8192,
                         use_tqdm_on_load=False, hf_token="hf_x", scheduling_policy="fcfs", speculative_config=None,
                         guided_decoding_backend="xgrammar", structured_outputs_config=None, kv_transfer_config=None,
                         calculate_kv_scales=False, disable_sliding_window=False, enable_sleep_mode=False,
                         model_impl="auto", num_scheduler_steps=1, served_model_name=["m"],
                         disable_async_output_proc=True) == engine_config()
    assert engine_config(kv_cache_memory_bytes=3 << 29).cache.kv_cache_memory_gib == 1.5, "vLLM counts bytes"
    with pytest.raises(TypeError, match="'kv_cache_memory_bytes' must be an integer"):
        engine_config(kv_cache_memory_bytes="1G")
    for key, value, instead in (("task", "embed", "pooling models"), ("cpu_offload_gb", 4, "tensor_parallel_size"),
                                ("logprobs_mode", "processed_logprobs", "before any sampling parameter"),
                                ("scheduling_policy", "priority", "prefix-sharing plan"),
                                ("speculative_config", {"method": "ngram"}, "speculative decoding")):
        with pytest.raises(TypeError, match=f"{key}={value!r} is not supported: .*{instead}"):
            engine_config(**{key: value})


def test_lora_and_prompt_embedding_settings_are_refused_as_such_and_taken_at_their_defaults(capsys):
    """LLM(max_loras=2) was "unknown engine option 'max_loras'; did you mean 'max_logprobs'?", and the rest of LoRA's
    settings, enable_prompt_embeds and config_format were unknown without a word of why."""
    from batchllm.cli import main
    from batchllm.options import engine_config

    assert engine_config(max_loras=1, max_lora_rank=16, max_cpu_loras=None, fully_sharded_loras=False,
                         lora_dtype="auto", enable_prompt_embeds=False, config_format="auto") == engine_config()
    for key, value in (("max_loras", 2), ("max_lora_rank", 64), ("fully_sharded_loras", True),
                       ("max_cpu_loras", 4)):
        with pytest.raises(TypeError, match=f"{key}={value!r} is not supported: LoRA adapters are not supported"):
            engine_config(**{key: value})
    with pytest.raises(TypeError, match="enable_prompt_embeds=True is not supported: prompts are text or token ids"):
        engine_config(enable_prompt_embeds=True)
    with pytest.raises(TypeError, match="config_format='mistral' is not supported: models are Hugging Face"):
        engine_config(config_format="mistral")
    with pytest.raises(TypeError, match="reasoning_parser='qwen3' is not supported: LLM's outputs keep the thinking"
                       ".*batchllm run --reasoning-parser"):
        engine_config(reasoning_parser="qwen3")
    with pytest.raises(SystemExit):
        main(["run", "in.jsonl", "-o", "out.jsonl", "--max-loras", "4"])
    err = capsys.readouterr().err.split("batchllm run: error:")[-1]  # (after the usage)
    assert "LoRA adapters are not supported" in err and "max-logprobs" not in err
    long_value = ["vllm.v1.sample.logits_processor.impls:DummyLogitsProcessor"]
    with pytest.raises(TypeError) as info:
        engine_config(logits_processors=long_value)
    assert "DummyLogitsProces... is not supported: custom logits processor classes" in str(info.value), \
        "a value cut short says so"


def test_the_rest_of_vllm_026s_llm_keywords_are_taken_at_their_defaults():
    """Every keyword of vLLM 0.26's `LLM.__init__`, at its default, is taken (these were "unknown engine
    option"); dtype as a torch dtype too, as vLLM takes it."""
    import torch

    from batchllm.options import engine_config

    assert engine_config(convert="auto", allowed_local_media_path="", allowed_media_domains=None,
                         mm_processor_kwargs=None, offload_group_size=0, offload_num_in_group=1,
                         offload_prefetch_step=1, offload_params=None, enable_return_routed_experts=False,
                         pooler_config=None, profiler_config=None, attention_config=None, quantization_config=None,
                         logits_processors=None, spec_method=None, spec_model=None, spec_tokens=None,
                         disable_sliding_window=True) == engine_config()
    assert engine_config(dtype=torch.bfloat16) == engine_config(dtype="bfloat16")
    with pytest.raises(TypeError, match="logits_processors=.* is not supported: custom logits processor classes"):
        engine_config(logits_processors=["my.Processor"])
    with pytest.raises(TypeError, match="engine option 'dtype' must be a string"):
        engine_config(dtype=torch.device("cpu"))


def test_a_structured_outputs_config_asking_for_xgrammar_is_taken(capsys):
    """LLM(structured_outputs_config={"backend": "xgrammar"}) was refused though it asks for what runs here; a
    dotted flag (--structured-outputs-config.backend xgrammar, vLLM's spelling of a field) was an unrecognized
    argument, though its hint said backend 'xgrammar' is taken: it is that field of the JSON form, checked as it is."""
    from types import SimpleNamespace

    from batchllm.cli import main
    from batchllm.options import engine_config, not_taken_accepts

    for config in ({"backend": "xgrammar"}, {"backend": "auto", "disable_any_whitespace": True},
                   SimpleNamespace(backend="xgrammar", disable_additional_properties=False), {},
                   {"backend": "xgrammar", "reasoning_parser": "", "reasoning_parser_plugin": "",
                    "enable_in_reasoning": False, "disable_fallback": False},  # (a whole vLLM 0.26 config)
                   {"enable_in_reasoning": True}):  # (the grammar holds from the first token: what true asks)
        assert engine_config(structured_outputs_config=config) == engine_config()
    for config in ({"backend": "guidance"}, {"backend": "xgrammar", "reasoning_parser": "qwen3"}, "xgrammar"):
        with pytest.raises(TypeError, match="structured_outputs_config=.* is not supported: structured output runs "
                                            "on xgrammar") as refused:
            engine_config(structured_outputs_config=config)
        assert "(Taken: vLLM's default, None, or a config of backend 'auto' or 'xgrammar', " in str(refused.value)
    for command in (["run", "in.jsonl", "-o", "o.jsonl"], ["bench"]):
        for words in (["--structured-outputs-config.backend", "xgrammar"],
                      ["--structured-outputs-config.disable_any_whitespace", "true",
                       "--structured-outputs-config.backend", "auto"],
                      ["--structured-outputs-config", "{}", "--structured-outputs-config.disable-fallback", "false"]):
            args = build_parser().parse_args([*command, *words])  # (vLLM's dotted flags: the JSON form's fields)
            assert not_taken_accepts("structured_outputs_config", args.structured_outputs_config), words
            assert engine_config(**engine_kwargs_from_args(args)) == engine_config(), words
        assert build_parser().parse_args(command).structured_outputs_config is None  # (the default is left alone)
        for words, value in ((["--structured-outputs-config.backend", "outlines"], "{'backend': 'outlines'}"),
                             (["--structured-outputs-config", '{"backend": "outlines"}'], "{'backend': 'outlines'}"),
                             (["--structured-outputs-config.backend", "xgrammar", "--structured-outputs-config."
                               "reasoning_parser", "qwen3"], "{'backend': 'xgrammar', 'reasoning_parser': 'qwen3'}")):
            with pytest.raises(SystemExit) as exit_:
                main([*command, *words])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and f"{value} is not supported: structured output runs on xgrammar" in err
            assert "unrecognized" not in err, err


def test_plan_checks_its_limits_as_run_does(tmp_path, capsys):
    """plan --max-model-len 0 planned a file whose every line failed; --groups -1 was taken silently."""
    from batchllm.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "x"}\n')
    assert main(["plan", str(src), "--max-model-len", "0"]) == 2
    assert "max_model_len must be >= 2, got 0" in capsys.readouterr().err
    assert main(["plan", str(src), "--groups", "-1"]) == 2
    assert "--groups must be >= 0, got -1" in capsys.readouterr().err


def test_max_model_len_auto_and_minus_one_are_the_models_context_as_in_vllm():
    """vLLM's --max-model-len takes auto (and -1): the model's context; both were refused."""
    import argparse

    from batchllm.options import add_engine_arguments, engine_config, engine_kwargs_from_args

    assert engine_config(max_model_len=-1) == engine_config(max_model_len="auto") == engine_config()
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    for text in ("auto", "AUTO"):
        assert engine_kwargs_from_args(parser.parse_args(["--max-model-len", text]))["max_model_len"] is None
    assert engine_kwargs_from_args(parser.parse_args(["--max-model-len", "4K"]))["max_model_len"] == 4096


def test_vllms_flexible_argument_parser_reads_underscores_and_bare_flags():
    """vLLM's examples build their command line on `FlexibleArgumentParser` (`from vllm.utils.argparse_utils
    import ...`); the import failed a ported script. It reads underscores in flag names as vLLM's does."""
    from batchllm import EngineArgs
    from batchllm.utils import FlexibleArgumentParser as FromUtils
    from batchllm.utils.argparse_utils import FlexibleArgumentParser

    assert FromUtils is FlexibleArgumentParser
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(description="a ported example"))
    parser.add_argument("prompt_file")
    args = parser.parse_args(["--max_model_len=4k", "--async-scheduling", "prompts.txt", "--enforce_eager"])
    assert (args.max_model_len, args.async_scheduling, args.prompt_file, args.enforce_eager) == (
        4000, "on", "prompts.txt", True)
    assert EngineArgs.from_cli_args(args).async_scheduling is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--no_such_flag", "x"])


def test_bench_takes_the_vllm_flags_without_effect_that_run_takes_from_one_definition(capsys):
    """`bench --disable-log-stats` (and --disable-log-requests, --swap-space 4 ...: vLLM's bench and serve take
    them) was refused as an unrecognized argument though `run` takes them: run added VLLM_NO_EFFECT's flags among
    its own output options, bench only VLLM_NOT_TAKEN's. Both now add them through `add_vllm_arguments`: every
    such flag of vLLM's engine (and AsyncEngineArgs') parses in both, changes nothing, and run's extra ones are
    vLLM's run-batch's alone."""
    from batchllm.cli import _subcommands, main
    from batchllm.options import VLLM_NO_EFFECT

    parser = build_parser()
    run_flags, bench_flags = (
        {f for a in _subcommands(parser)[name]._actions for f in a.option_strings} for name in ("run", "bench"))
    for name, option in VLLM_NO_EFFECT.items():
        flag = "--" + name.replace("_", "-")
        assert flag in run_flags, flag  # (run's own where it has one: --served-model-name)
        if option.run_has_own_flag:
            assert flag in bench_flags, flag
            continue
        assert (flag in bench_flags) == (not option.run_batch_only or option.async_engine), flag
    assert {"-pp", "--task", "--distributed-executor-backend", "--disable-log-requests"} <= bench_flags & run_flags
    vllm_words = ["--disable-log-stats", "--disable-log-requests", "--enable-log-requests", "--swap-space", "4",
                  "--tokenizer-mode", "auto", "--disable-custom-all-reduce", "--use-tqdm-on-load", "-pp", "1",
                  "--distributed-executor-backend", "mp", "--task", "generate"]
    for command in (["run", "in.jsonl", "-o", "o.jsonl"], ["bench"]):
        args = build_parser().parse_args([*command, *vllm_words])
        assert args.disable_log_stats and args.enable_log_requests and args.swap_space == 4.0, command
        assert engine_config(**engine_kwargs_from_args(args)) == engine_config(), command  # (taken and dropped)
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--tokenizer-mode", "mistral"])  # a value that would change something is still refused
    assert exit_.value.code == 2
    assert "'mistral' is not supported (the tokenizer is transformers'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["run", "in.jsonl", "-o", "o.jsonl"], ["bench"]])
def test_a_not_taken_flags_number_is_read_as_vllm_types_it(command, capsys):
    """`-pp 01` was refused ("'01' is not supported") though it is 1: the value was read as JSON, where 01 is no
    number, and compared with the int 1 as the text '01'. vLLM's parser reads -pp as an int (01 is 1, taken), so a
    number option's value is read as its number type here too; a value that is no such number is still refused,
    naming it."""
    from batchllm.cli import main

    args = build_parser().parse_args([*command, "-pp", "01", "--cpu-offload-gb", "0", "-O", "03", "--max-loras=+1"])
    assert (args.pipeline_parallel_size, args.cpu_offload_gb, args.optimization_level, args.max_loras) == (1, 0.0,
                                                                                                            3, 1)
    assert type(args.pipeline_parallel_size) is int and type(args.cpu_offload_gb) is float
    assert engine_config(**engine_kwargs_from_args(args)) == engine_config()
    for words, shown in ((["-pp", "02"], "-pp: 2 is not supported"), (["-pp", "1.0"], "-pp: 1.0 is not supported"),
                         (["-pp", "one"], "-pp: 'one' is not supported")):
        with pytest.raises(SystemExit) as exit_:
            main([*command, *words])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and shown in err, err


@pytest.mark.parametrize("command", [["run", "in.jsonl", "-o", "o.jsonl"], ["bench"]])
def test_abbreviations_are_taken_as_vllm_takes_them_and_an_ambiguous_one_is_refused_clearly(command, capsys):
    """vLLM's FlexibleArgumentParser keeps argparse's abbreviations (allow_abbrev), so they are taken here too: a
    full name is itself even where it begins other flags (--model beside --model-impl, --tokenizer, --quantization,
    --device), an abbreviation that begins one flag alone is that flag. One that begins several (`--mo`: vLLM's
    --model-impl, --moe-backend ... since run and bench take every vLLM flag) was refused with argparse's bare list,
    hidden flags first; the refusal now lists the --help flags first and says to write the whole flag."""
    from batchllm.cli import main

    for words in (["--model", "m", "--tokenizer", "t", "--quantization", "fp8", "--device", "cpu"],
                  ["--model=m", "--tokenizer=t", "--quantization=FP8", "--device=cpu"]):
        args = build_parser().parse_args([*command, *words])
        assert (args.model, args.tokenizer, args.quantization, args.device) == ("m", "t", "fp8", "cpu"), words
    assert build_parser().parse_args([*command, "--max-model", "4k"]).max_model_len == 4000  # (one flag begins so)
    for word in ("--mo", "--mo=m"):
        with pytest.raises(SystemExit) as exit_:
            main([*command, word, *([] if "=" in word else ["m"])])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and (f"error: ambiguous option: {word.split('=')[0]} could match --model, "
                                          "--model-class-overrides, ") in err, err
        assert err.rstrip().endswith("write the whole flag (an abbreviation is taken only where it begins one flag, "
                                     "as on vLLM's command line)"), err


def _actions(parser: argparse.ArgumentParser, words: list[str]) -> list[argparse.Action]:
    """The actions of `parser`'s subcommand words[0] (a subparsers action's chosen parser), else its own."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and words:
            return action.choices[words[0]]._actions
    return parser._actions


@pytest.mark.parametrize("command", ["run", "bench", "engine_args"])
def test_vllms_kv_cache_memory_bytes_flag_is_taken_as_the_keyword_is(command):
    """`LLM(kv_cache_memory_bytes=...)` and EngineArgs' field were taken, but the flag was refused as unknown
    ('did you mean --kv-cache-memory-gib?') by run, bench and add_cli_args: it now sets the same option, in bytes."""
    from batchllm.engine_args import EngineArgs

    if command == "engine_args":
        parser, words = EngineArgs.add_cli_args(argparse.ArgumentParser()), []
    else:
        parser, words = build_parser(), [command] + (["in.jsonl", "-o", "out.jsonl"] if command == "run" else [])
    assert parser.parse_args(words + ["--kv-cache-memory-bytes", str(3 * 2**30)]).kv_cache_memory_gib == 3.0
    assert parser.parse_args(words + ["--kv-cache-memory-bytes", "512M"]).kv_cache_memory_gib == 0.5
    assert parser.parse_args(words).kv_cache_memory_gib is None
    assert engine_config(**engine_kwargs_from_args(parser.parse_args(
        words + ["--kv-cache-memory-bytes", "1G"]))).cache.kv_cache_memory_gib == 1.0
    # its --help placeholder is its own: it read KV_CACHE_MEMORY_GIB (the option it sets), a value in GiB
    [flag] = [a for a in _actions(parser, words) if "--kv-cache-memory-bytes" in a.option_strings]
    assert flag.metavar == "KV_CACHE_MEMORY_BYTES"


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "bfloat16", "float16"])
def test_fp8_attention_over_a_16_bit_cache_is_refused_naming_both_options(kv_cache_dtype, tmp_path, capsys):
    """Both attention backends take FP8 operands only over an fp8 cache (torch_ref: is_fp8(kv_cache);
    Triton: its fp8 flag); with kv_cache_dtype bfloat16 / float16 the option was taken and did nothing. "auto" is
    refused once the model says it means a 16-bit cache (a checkpoint declaring an FP8 cache makes it fp8:
    test_fp8.py), before the output is made."""
    from batchllm.cli import main

    given = "'auto' (the checkpoint declares no FP8 cache)" if kv_cache_dtype == "auto" else f"'{kv_cache_dtype}'"
    message = re.escape(f"fp8_attention needs an fp8 KV cache: kv_cache_dtype={given} keeps a 16-bit cache")
    if kv_cache_dtype == "auto":
        assert engine_config(fp8_attention=True, kv_cache_dtype="auto").model.fp8_attention
    else:
        with pytest.raises(ValueError, match=message):
            engine_config(fp8_attention=True, kv_cache_dtype=kv_cache_dtype)
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "x"}\n')
    argv = ["run", str(src), "-o", str(tmp_path / "out"), "--fp8-attention", "--kv-cache-dtype", kv_cache_dtype]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err) and not (tmp_path / "out").exists()
    for fp8 in ("fp8", "fp8_e4m3"):
        assert engine_config(fp8_attention=True, kv_cache_dtype=fp8).model.fp8_attention


def test_auto_tool_choice_is_served_by_a_parser_named_at_start_and_recorded_with_the_jobs_options(capsys, tmp_path):
    """--enable-auto-tool-choice --tool-call-parser NAME (vLLM's) serves "auto" lines: a parser not served here is
    refused before anything is written, naming those that are; one that needs a token the tokenizer lacks
    (llama3_json's <|python_tag|>) too; the parser "auto" lines are read by is recorded with the options a resume
    must keep (None without --enable-auto-tool-choice, as outputs written before it existed recorded it)."""
    from batchllm.cli import build_parser, check_parsers_tokenizer, main, results_options

    with pytest.raises(SystemExit) as exit_:
        main(["run", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--enable-auto-tool-choice",
              "--tool-call-parser", "granite"])
    assert exit_.value.code == 2 and not (tmp_path / "o.jsonl").exists()
    assert ("--tool-call-parser 'granite' is not served here (served: hermes, llama3_json, llama4_json, pythonic, "
            "llama4_pythonic, mistral)" in capsys.readouterr().err)

    def recorded(*flags: str):
        return results_options(build_parser().parse_args(["run", "i", "-o", "o", *flags]), {})["auto_tool_choice"]

    assert recorded() is None and recorded("--tool-call-parser", "hermes") is None
    assert recorded("--enable-auto-tool-choice", "--tool-call-parser", "hermes") == "hermes"
    check_parsers_tokenizer(build_parser().parse_args(["run", "i", "-o", "o", "--enable-auto-tool-choice",
                                                       "--tool-call-parser", "hermes"]))
    with pytest.raises(ValueError, match=r"--tool-call-parser llama3_json: the tokenizer has no <\|python_tag\|>"):
        check_parsers_tokenizer(build_parser().parse_args(["run", "i", "-o", "o", "--enable-auto-tool-choice",
                                                           "--tool-call-parser", "llama3_json"]))


def test_a_mistral_tool_parser_job_is_refused_at_start_for_a_tokenizer_without_its_token(capsys, tmp_path):
    """vLLM 0.26's MistralToolParser raises without a [TOOL_CALLS] token in the vocabulary (every chat request fails):
    `run --enable-auto-tool-choice --tool-call-parser mistral` on such a model (the default SmolLM2) is refused
    before anything is written, exit 2; the pythonic parsers read text and need no token."""
    from batchllm.cli import build_parser, check_parsers_tokenizer, main

    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "hi"}\n')
    argv = ["run", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--enable-auto-tool-choice",
            "--tool-call-parser", "mistral"]
    assert main(argv) == 2 and not (tmp_path / "o.jsonl").exists()
    assert ("--tool-call-parser mistral: the tokenizer has no [TOOL_CALLS] token (as vLLM's parser, it needs it); "
            "this model does not write Mistral tool calls") in capsys.readouterr().err
    for name in ("pythonic", "llama4_pythonic"):
        check_parsers_tokenizer(build_parser().parse_args(["run", "i", "-o", "o", "--enable-auto-tool-choice",
                                                           "--tool-call-parser", name]))


def test_a_log_level_that_names_no_level_is_refused_before_the_job(tmp_path, capsys, monkeypatch):
    """BATCHLLM_LOG_LEVEL=bogus ended `run` in logging's traceback with exit 1 ("some lines failed")."""
    from batchllm import cli
    from batchllm.config import default_log_level

    monkeypatch.setattr(cli, "run_command", lambda args: pytest.fail("the job must not start"))
    monkeypatch.setenv("BATCHLLM_LOG_LEVEL", "bogus")
    code = cli.main(["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl")])
    assert code == 2 and "BATCHLLM_LOG_LEVEL must be one of DEBUG, INFO, WARNING" in capsys.readouterr().err
    assert default_log_level() == "WARNING", "the library (imported by LLM users) falls back instead"
    monkeypatch.setenv("BATCHLLM_LOG_LEVEL", "info")
    assert default_log_level() == "INFO"


def test_vllms_log_level_is_read_and_its_other_variables_are_named_as_unread(tmp_path, capsys, monkeypatch):
    """vLLM's VLLM_LOGGING_LEVEL did nothing, and every VLLM_* variable was ignored without a word (a job with
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 was refused with no word on it). The first sets the level under
    BATCHLLM_LOG_LEVEL; the others are named once on stderr."""
    from batchllm import cli
    from batchllm.config import default_log_level

    for name in [n for n in os.environ if n.startswith("VLLM_") or n == "BATCHLLM_LOG_LEVEL"]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(cli, "run_command", lambda args: 0)
    run = ["run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl")]
    assert cli.main(run) == 0 and "VLLM" not in capsys.readouterr().err
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "debug")
    assert default_log_level() == "DEBUG"
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "warn")  # (logging's alias, which vLLM takes)
    assert default_log_level() == "WARN" and cli.main(run) == 0
    monkeypatch.setenv("BATCHLLM_LOG_LEVEL", "error")
    assert default_log_level() == "ERROR", "this project's variable wins"
    monkeypatch.delenv("BATCHLLM_LOG_LEVEL")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "loud")
    assert cli.main(run) == 2 and "VLLM_LOGGING_LEVEL must be one of DEBUG" in capsys.readouterr().err
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    monkeypatch.setenv("VLLM_USE_V1", "1")
    assert cli.main(run) == 0
    assert ("batchllm: note: vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN, VLLM_USE_V1 are not read here (no effect)"
            in capsys.readouterr().err)


def _parsed_with_config(words, monkeypatch):
    """What `cli.main(words)` hands the run command (the job itself replaced by catching its arguments)."""
    from batchllm import cli

    caught = []
    monkeypatch.setattr(cli, "run_command", lambda args: caught.append(args) or 0)
    assert cli.main(words) == 0
    return caught[0]


def test_vllms_config_file_gives_options_that_the_command_line_overrides(tmp_path, monkeypatch):
    """vLLM's `--config FILE.yaml` (its FlexibleArgumentParser's) was refused: a vLLM user's run-batch config did
    not carry over. Its keys are flags (dashes or underscores), put before the command line's, which wins; true is
    the bare flag, false the `--no-` form, a list the flag repeated where it appends, a mapping its JSON, null the
    option's default."""
    config = tmp_path / "run.yaml"
    config.write_text("max-num-batched-tokens: 4096\nmax_tokens: 5\nasync-scheduling: false\nenforce-eager: true\n"
                      "stop: [\"END\", \"---\"]\nseed: -1\noverwrite: false\nrevision: null\n"
                      "default-chat-template-kwargs: {enable_thinking: false, date_string: 2024-07-26}\n"
                      "chat-template: null\nquantization: null\nmax-log-len: null\nkv-cache-memory-bytes: null\n"
                      "max-model-len: ~\ntool-server: null\nlog-config-file: null\n")  # (vLLM flags not taken here:
    # null, their default, is taken; a value is refused naming what to do instead)
    args = _parsed_with_config(["run-batch", "-i", "in.jsonl", "--config", str(config), "-o", "o.jsonl",
                                "--max-tokens", "7"], monkeypatch)
    assert (args.max_num_batched_tokens, args.max_tokens, args.async_scheduling, args.enforce_eager) == (
        4096, 7, "off", True), "the command line's --max-tokens 7 wins over the file's 5"
    assert (args.stop, args.seed, args.overwrite) == (["END", "---"], -1, False), "a dash-led value stays a value"
    assert args.default_chat_template_kwargs == {"enable_thinking": False, "date_string": "2024-07-26"}
    # null: vLLM's None, these options' default (the text "None" was refused as a path, a number or a choice)
    assert (args.chat_template, args.quantization, args.max_model_len) == (None, None, None)
    args = _parsed_with_config([f"--config={config}", "run", "in.jsonl", "-o", "o.jsonl"], monkeypatch)
    assert (args.input, args.max_tokens) == (Path("in.jsonl"), 5), "--config=FILE before the command is read too"
    from batchllm import cli

    with pytest.raises(SystemExit) as stopped:  # (--version and --help first, whatever --config names)
        cli.main(["--version", "--config", str(tmp_path / "none.yaml")])
    assert stopped.value.code == 0


@pytest.mark.parametrize("text, problem", [
    ("- max-tokens\n", "must hold a mapping of option names to values"),
    ("max-tokens: [1, 2]\n", "max-tokens takes one value, not a list"),
    ("max-tokns:\n", "max-tokns is no option of this command"),
    ("tool-server: localhost:1\n", "no tool server"),
    ("enable-prefix-cachng: false\n", "enable-prefix-cachng is no option of this command"),
    ("overwrite: true\n", "overwrite is not taken from a config file"),
    ("default-chat-template-kwargs: {a: &x [1, *x]}\n", "cannot be written as a flag's value"),
    ("config: other.yaml\n", "a config file cannot name another"),
    ("max-tokens: [1\n", "not valid YAML"),
    ("max-tokns: 5\n", "--max-tokns: did you mean --max-tokens"),
])
def test_a_config_file_that_cannot_be_read_as_options_is_named(text, problem, tmp_path, capsys, monkeypatch):
    from batchllm import cli

    monkeypatch.setattr(cli, "run_command", lambda args: pytest.fail("the job must not start"))
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", "in.jsonl", "-o", "o.jsonl", "--config", str(config)])
    assert stopped.value.code == 2 and problem in capsys.readouterr().err


@pytest.mark.parametrize("words, problem", [
    (["--config", "{dir}/none.yaml"], "cannot read it: No such file or directory"),
    (["--config", "{dir}/run.txt"], "a config file is YAML (.yaml or .yml, as vLLM's) or JSON"),
    (["--config", "{dir}/a.yaml", "--config={dir}/a.yaml"], "--config is given more than once"),
    (["--config"], "--config needs a file"),
])
def test_a_config_flag_without_one_readable_file_is_named(words, problem, tmp_path, capsys):
    from batchllm import cli

    (tmp_path / "a.yaml").write_text("max-tokens: 5\n")
    (tmp_path / "run.txt").write_text("max-tokens: 5\n")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", "in.jsonl", "-o", "o.jsonl", *(w.format(dir=tmp_path) for w in words)])
    assert stopped.value.code == 2 and problem in capsys.readouterr().err
    assert cli.build_parser().parse_args(["bench", "--configs", "sharing"]).configs == "sharing", "bench's own flag"


def test_flexible_argument_parser_reads_a_config_file_first(tmp_path):
    """A ported script's parser (no subcommands) reads `--config` too, its file's options first."""
    from batchllm import EngineArgs
    from batchllm.utils.argparse_utils import FlexibleArgumentParser

    config = tmp_path / "engine.yml"
    config.write_text("max_model_len: 4k\nenforce-eager: true\nasync-scheduling: true\nserved-model-name: [a, b]\n")
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(description="a ported example"))
    parser.add_argument("prompt_file")
    args = parser.parse_args(["prompts.txt", "--config", str(config), "--max-model-len", "2k"])
    assert (args.max_model_len, args.enforce_eager, args.async_scheduling, args.prompt_file) == (
        2000, True, "on", "prompts.txt"), "after the first word, as vLLM's: the list did not swallow it"
    assert args.served_model_name == ["a", "b"]


@pytest.mark.parametrize("command", ["run", "plan", "bench"])
def test_help_names_the_config_file_option(command, capsys):
    """The README says `run --help` lists every option; --config FILE.yaml (read before argparse) was in none."""
    from batchllm.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--config FILE.yaml" in capsys.readouterr().out
