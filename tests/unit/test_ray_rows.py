"""The Ray path's row stage (`batchllm.ray.stages.tokenize_batch`, called here without Ray): a row
the model cannot serve gets its own `error`, as the single-machine reader fails that line, and the
other rows go on. Skipped without pyarrow (the `ray` extra)."""

from __future__ import annotations

import pytest

pa = pytest.importorskip("pyarrow")

from batchllm.io.ingest import LineServing  # noqa: E402
from batchllm.ray.config import ProcessorConfig  # noqa: E402
from batchllm.ray.stages import ERROR, tokenize_batch  # noqa: E402

VOCAB = 49152  # the embedded SmolLM2-135M-Instruct's
REQUESTS = [
    {"prompt": "Hi", "sampling_params": {"logprobs": 20, "stop_token_ids": [2]}},
    {"prompt": "Hi", "sampling_params": {"stop_token_ids": [VOCAB]}},  # taken, as vLLM 0.26 takes it
    {"prompt": "Hi", "sampling_params": {"logit_bias": {VOCAB + 5: 1.0}}},
    {"prompt": "Hi", "sampling_params": {"allowed_token_ids": [1, 10**9]}},
    {"prompt": "Hi", "sampling_params": {"logprobs": 100000}},
    {"prompt": "Hi", "sampling_params": {"prompt_logprobs": 21}},
]


def row_errors(config: ProcessorConfig) -> list[str | None]:
    table = pa.table({"i": list(range(len(REQUESTS)))})
    out = tokenize_batch(table, config=config, preprocess=lambda row: REQUESTS[row["i"]], num_buckets=1)
    return out.column(ERROR).to_pylist()


def test_rows_are_checked_against_the_model_as_local_lines_are():
    """The Ray path only built SamplingParams(**fields): ids past the vocabulary and logprobs above
    max_logprobs (a whole vocabulary per token) reached the engine instead of failing their row."""
    cap = "is more than max_logprobs (20); raise it with --max-logprobs / LLM(max_logprobs=...) (-1: no cap)"
    assert row_errors(ProcessorConfig()) == [
        None,
        None,
        f"SamplingParams.logit_bias: token id {VOCAB + 5} is outside the vocabulary [0, {VOCAB})",
        f"SamplingParams.allowed_token_ids: token id {10**9} is outside the vocabulary [0, {VOCAB})",
        f"SamplingParams.logprobs = 100000 {cap}",
        f"SamplingParams.prompt_logprobs = 21 {cap}",
    ]


def test_the_logprobs_cap_is_the_engine_option():
    errors = row_errors(ProcessorConfig(engine_kwargs={"max_logprobs": -1}))
    assert errors[0] is None and errors[4] is None and errors[5] is None
    assert errors[1] is None and all(errors[i] and "outside the vocabulary" in errors[i] for i in (2, 3))


def test_a_row_whose_max_tokens_must_fit_is_refused_past_the_context():
    """The CLI's OpenAI lines with their own max_tokens set `max_tokens_must_fit`: as OpenAI's API, a
    prompt and max_tokens past the context fail the row; without the flag generation stops at it."""
    from batchllm.ray.stages import MUST_FIT

    rows = [{"prompt": "word " * 40, "sampling_params": {"max_tokens": 60}, MUST_FIT: True},
            {"prompt": "word " * 40, "sampling_params": {"max_tokens": 60}},
            {"prompt": "word " * 40, "sampling_params": {"max_tokens": 8}, MUST_FIT: True}]
    table = pa.table({"i": list(range(len(rows)))})
    out = tokenize_batch(table, config=ProcessorConfig(max_model_len=64),
                         preprocess=lambda row: rows[row["i"]], num_buckets=1)
    errors = out.column(ERROR).to_pylist()
    assert errors[1] is None and errors[2] is None, errors
    assert errors[0].startswith("the model's context (max_model_len) is 64 tokens, but ") and "60 for the" in errors[0]


def test_a_row_that_must_fit_without_a_max_tokens_runs_to_the_context():
    """max_tokens None (vLLM's: up to the context) always fits; the check passed None on to its sum and
    failed the row with a TypeError's message."""
    from batchllm.ray.stages import MUST_FIT

    table = pa.table({"i": [0]})
    out = tokenize_batch(table, config=ProcessorConfig(max_model_len=64, max_tokens=None),
                         preprocess=lambda row: {"prompt": "word " * 40, MUST_FIT: True}, num_buckets=1)
    assert out.column(ERROR).to_pylist() == [None]


def test_a_row_the_kv_cache_cannot_hold_fails_alone():
    """Such a row stopped its replica's engine, and the restarted replica met it again, without end;
    now it gets its own error and the bucket's other rows run."""
    from batchllm.ray.stages import EngineReplica

    config = ProcessorConfig(device="cpu", dtype="float32", max_model_len=256, max_tokens=2,
                             sampling_params={"ignore_eos": True}, engine_kwargs={"num_kv_blocks": 4, "block_size": 16})
    rows = [{"prompt": "Hi"}, {"prompt": "word " * 80}, {"prompt": "Hello"}]
    table = tokenize_batch(pa.table({"i": [0, 1, 2]}), config=config, preprocess=lambda row: rows[row["i"]],
                           num_buckets=1)
    replica = EngineReplica(config)
    try:
        out = replica(table)
    finally:
        replica.llm.shutdown()
    errors = out.column(ERROR).to_pylist()
    assert errors[0] is None and errors[2] is None, errors
    assert "tokens of KV cache, but the cache holds 64" in errors[1]
    assert [n for n in out.column("num_generated_tokens").to_pylist()] == [2, None, 2]


def test_a_row_with_integers_written_as_floats_runs():
    """Ray Data rows from pandas hold an integer column with gaps as floats (max_tokens 8.0): read as
    integers, as vLLM's pydantic reads a request, where SamplingParams refused the row; 8.5 still fails."""
    rows = [{"prompt": "Hi", "sampling_params": {"max_tokens": 8.0, "seed": 3.0}},
            {"prompt": "Hi", "sampling_params": {"max_tokens": 8.5}}]
    table = pa.table({"i": [0, 1]})
    out = tokenize_batch(table, config=ProcessorConfig(), preprocess=lambda row: rows[row["i"]], num_buckets=1)
    errors = out.column(ERROR).to_pylist()
    assert errors[0] is None and "max_tokens must be a positive integer" in errors[1], errors


def test_the_cli_rows_without_max_tokens_run_unbounded_as_the_single_machine_lines_do():
    """run --ray cut an OpenAI line without max_tokens at the config's 256: the row stage dropped the null
    the CLI's preprocess gave, since in a row null is "not given" (as in a plain line, which keeps 256)."""
    import json

    import batchllm.cli as cli
    from batchllm.ray.jsonl_job import DUPLICATE, LINE, RAW, _CliPreprocess
    from batchllm.ray.stages import SAMPLING

    args = cli.build_parser().parse_args(["run", "in.jsonl", "-o", "out"])
    defaults = cli.sampling_defaults(args)
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    lines = [{"custom_id": "c", "url": "/v1/chat/completions", "body": chat},
             {"custom_id": "o", "url": "/v1/completions", "body": {"prompt": "Hi"}},  # (OpenAI's and vLLM's 16)
             {"id": "p", "prompt": "Hi", "max_tokens": None}, {"id": "q", "prompt": "Hi"}]
    table = pa.table({RAW: [json.dumps(x).encode() for x in lines], LINE: [1, 2, 3, 4], DUPLICATE: [False] * 4})
    out = tokenize_batch(table, config=ProcessorConfig(max_tokens=defaults["max_tokens"]),
                         preprocess=_CliPreprocess(defaults, None), num_buckets=1)
    assert [json.loads(s)["max_tokens"] for s in out.column(SAMPLING).to_pylist()] == [None, 16, 256, 256]


def test_the_cli_rows_errors_name_an_openai_lines_own_fields():
    """run --ray wrote "SamplingParams.temperature ..." for an OpenAI line, where run names the body's field."""
    import json

    from batchllm.io.ingest import ResponseShape
    from batchllm.ray.jsonl_job import DUPLICATE, LINE, RAW, RECORD, _CliRecords

    raw = json.dumps({"custom_id": "c", "url": "/v1/chat/completions",
                      "body": {"messages": [{"role": "user", "content": "Hi"}], "temperature": -1}}).encode()
    error = "line 1: SamplingParams.temperature must be >= 0, got -1"
    records = _CliRecords(ResponseShape("m"), "openai")
    record = json.loads(records({RAW: raw, LINE: 1, DUPLICATE: False}, None, error)[RECORD])
    assert record["error"]["message"] == "line 1: temperature must be >= 0, got -1"


def test_a_rows_truncate_prompt_tokens_keeps_its_last_tokens():
    from batchllm.ray.stages import TOKENS

    rows = [{"prompt": "word " * 100, "sampling_params": {"truncate_prompt_tokens": 20}},
            {"prompt_token_ids": list(range(1, 101)), "sampling_params": {"truncate_prompt_tokens": -1}},
            {"messages": [{"role": "user", "content": "word " * 100}],
             "sampling_params": {"truncate_prompt_tokens": 9}},
            # (a conversation whose turns before the last outgrow the context: the prefix hint failed the row)
            {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": "hi"}], "sampling_params": {"truncate_prompt_tokens": 10}},
            {"prompt": "word " * 100}]
    table = pa.table({"i": list(range(len(rows)))})
    out = tokenize_batch(table, config=ProcessorConfig(max_model_len=64),
                         preprocess=lambda row: rows[row["i"]], num_buckets=1)
    errors, tokens = out.column(ERROR).to_pylist(), out.column(TOKENS).to_pylist()
    assert errors[:4] == [None] * 4 and "max_model_len" in errors[4]
    assert [len(t) for t in tokens[:4]] == [20, 63, 9, 10] and tokens[1] == list(range(38, 101))


def test_vllm_ray_engine_kwargs_are_taken_and_a_field_set_twice_is_named():
    """vLLM's Ray example puts max_num_batched_tokens and enable_prefix_caching in engine_kwargs: one was
    "got multiple values for keyword argument", the other "'enable_prefix_caching' and 'prefix_sharing' are the
    same option", though the user gave each once."""
    config = ProcessorConfig(engine_kwargs={"enable_prefix_caching": False, "max_num_batched_tokens": 4096,
                                            "enable_chunked_prefill": True})
    options = config.engine_options()
    assert (options["prefix_sharing"], options["max_num_batched_tokens"]) == (False, 4096)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens is given twice, as ProcessorConfig.max_num_b"):
        ProcessorConfig(max_num_batched_tokens=2048, engine_kwargs={"max_num_batched_tokens": 4096})


def test_several_replicas_draw_unseeded_noise_of_their_own_and_one_keeps_the_configs_seed():
    """Replicas all seeded with the config's seed drew the same noise: identical unseeded rows on two replicas came
    back as copies (8 distinct of 16). Each of several replicas now has a seed of its own; one replica keeps the
    config's (its runs repeat, as an LLM's)."""
    from batchllm.ray.stages import replica_engine_options

    assert replica_engine_options(ProcessorConfig(seed=7))["seed"] == 7
    seeds = {replica_engine_options(ProcessorConfig(seed=7, num_replicas=2))["seed"] for _ in range(8)}
    assert len(seeds) == 8 and 7 not in seeds and all(0 <= s < 1 << 64 for s in seeds)


def test_numpy_values_and_detokenize_false_in_a_rows_sampling_params_run():
    """A Ray row's columns come as numpy values (np.float32(0.5) was "must be a number"); vLLM's Ray examples set
    detokenize False, and Ray's own stage still fills generated_text (it came back empty)."""
    import json

    import numpy as np

    from batchllm.ray.stages import SAMPLING
    from batchllm.sampling_params import RequestOutputKind

    rows = [{"prompt": "Hi", "sampling_params": {"temperature": np.float32(0.5), "max_tokens": np.int64(3),
                                                 "detokenize": False,  # and vLLM's output_kind (it failed the batch)
                                                 "output_kind": RequestOutputKind.FINAL_ONLY}}]
    out = tokenize_batch(pa.table({"i": [0]}), config=ProcessorConfig(), preprocess=lambda row: rows[row["i"]],
                         num_buckets=1)
    assert out.column(ERROR).to_pylist() == [None]
    fields = json.loads(out.column(SAMPLING).to_pylist()[0])
    assert fields["temperature"] == 0.5 and fields["max_tokens"] == 3 and "detokenize" not in fields
    assert "output_kind" not in fields


def test_failed_rows_pass_by_postprocess_and_no_rows_column_is_lost():
    """postprocess ran on failed rows (generated_text None: its own error hid the row's), and the output took the
    first row's columns only: a failed first row dropped the good rows' answers, a good one the errors. With n > 1,
    num_generated_tokens counts the first completion's tokens, as its text (it was the sum over all n)."""
    from batchllm.ray.stages import EngineReplica

    config = ProcessorConfig(device="cpu", dtype="float32", max_model_len=64, max_tokens=3,
                             sampling_params={"temperature": 0, "ignore_eos": True})
    rows = [{"prompt": "word " * 80}, {"prompt": "Hi", "sampling_params": {"n": 2, "temperature": 1.0, "seed": 1}},
            {"prompt": "Hello"}]
    table = tokenize_batch(pa.table({"id": [0, 1, 2]}), config=config, preprocess=lambda row: rows[row["id"]],
                           num_buckets=1)
    replica = EngineReplica(config, postprocess=lambda r: {"id": r["id"], "answer": r["generated_text"].strip(),
                                                            "n": r["num_generated_tokens"]})
    try:
        out = replica(table).to_pylist()
    finally:
        replica.llm.shutdown()
    assert "max_model_len" in out[0]["error"] and out[0].get("answer") is None, out[0]
    assert out[0]["error"].startswith("the prompt has"), "not 'prompt 0', which named no row"
    assert [row["id"] for row in out] == [0, 1, 2] and all(out[i]["answer"] is not None for i in (1, 2))
    assert out[1]["error"] is None and out[1]["n"] == 3 == out[2]["n"]


def test_a_context_past_the_models_fails_on_the_driver_where_it_can_read_the_model(tiny_model_factory):
    """ProcessorConfig(engine_kwargs={"max_model_len": 16384}) was taken on the driver, then every replica died
    building its engine after Ray had started the job."""
    model = tiny_model_factory("llama")  # max_position_embeddings 1024
    for config in ({"max_model_len": 16384}, {"engine_kwargs": {"max_model_len": 16384}}):
        with pytest.raises(ValueError, match="16384.*1024"):
            ProcessorConfig(model=model, **config)
    assert ProcessorConfig(model=model, max_model_len=512).max_model_len == 512
    assert ProcessorConfig(model="org/only-on-the-workers", max_model_len=16384).model == "org/only-on-the-workers"


def test_structured_outputs_objects_and_numpy_values_in_a_rows_sampling_params_are_read():
    """A row whose sampling_params held a StructuredOutputsParams (every structured line of `run --ray`, and vLLM's
    GuidedDecodingParams habit) failed the whole job (JSON could not write it, outside the row's own check)."""
    import json

    import numpy as np

    from batchllm.ray.stages import SAMPLING
    from batchllm.structured import GuidedDecodingParams, StructuredOutputsParams

    rows = [{"prompt": "yes or no:", "sampling_params": {"structured_outputs": StructuredOutputsParams(
                choice=["yes", "no"])}},
            {"prompt": "hi", "sampling_params": {"guided_decoding": GuidedDecodingParams(regex="[a-z]+"),
                                                  "stop_token_ids": list(np.array([2, 3]))}},
            {"prompt": "hi", "sampling_params": {"stop": object()}}]
    table = pa.table({"i": list(range(len(rows)))})
    out = tokenize_batch(table, config=ProcessorConfig(), preprocess=lambda row: rows[row["i"]], num_buckets=1)
    errors, sampling = out.column(ERROR).to_pylist(), out.column(SAMPLING).to_pylist()
    assert errors[:2] == [None, None] and errors[2], "a value nothing can read fails its row alone"
    assert json.loads(sampling[0])["structured_outputs"]["choice"] == ["yes", "no"]
    assert json.loads(sampling[1])["guided_decoding"]["regex"] == "[a-z]+"
    assert json.loads(sampling[1])["stop_token_ids"] == [2, 3]


def test_postprocessed_rows_of_mixed_types_keep_their_answers():
    """A postprocess giving a column ints on some rows and text on others failed the call after its generation
    (Arrow cannot mix them); Ray's own map keeps such values as Python objects."""
    from batchllm.ray.stages import _table_of_rows

    table = _table_of_rows([{"text": "a", "parsed": 1}, {"text": "b", "parsed": "n/a"}, {"text": "c"}])
    assert list(table["parsed"]) == [1, "n/a", None] and list(table["text"]) == ["a", "b", "c"]
    assert _table_of_rows([{"x": 1}, {"x": 2}]).column("x").to_pylist() == [1, 2]


def test_parallel_sizes_in_engine_kwargs_ask_their_gpus(monkeypatch):
    """vLLM's Ray configs give tensor_parallel_size in engine_kwargs: the engine got it, but each replica asked one
    GPU for a two-GPU engine."""
    import ray

    from batchllm.ray.processor import Processor

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 8.0})
    for config, gpus in ((ProcessorConfig(engine_kwargs={"tensor_parallel_size": 2}), 2),
                         (ProcessorConfig(tensor_parallel_size=2, data_parallel_size=2), 4),
                         (ProcessorConfig(engine_kwargs={"data_parallel_size": 2, "device": "cpu"}), 0)):
        assert Processor(config, None, None)._num_gpus() == gpus


def test_the_cli_rows_take_the_default_chat_template_kwargs_under_a_lines_own():
    """run --ray with --default-chat-template-kwargs: each chat row carries the job's keywords under its own,
    as the single-machine reader renders them (`prepare_lines`)."""
    import json

    from batchllm.ray.jsonl_job import DUPLICATE, LINE, RAW, _CliPreprocess

    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    lines = [{"id": "a", **chat}, {"id": "b", **chat, "chat_template_kwargs": {"enable_thinking": True, "x": 1}},
             {"id": "c", "prompt": "Hi"}]
    preprocess = _CliPreprocess({"max_tokens": 4}, None, LineServing({"enable_thinking": False}))
    rows = [preprocess({RAW: json.dumps(x).encode(), LINE: i, DUPLICATE: False}) for i, x in enumerate(lines)]
    assert [row["chat_template_kwargs"] for row in rows] == [
        {"enable_thinking": False}, {"enable_thinking": True, "x": 1}, None]


def test_the_cli_records_split_reasoning_under_the_jobs_template_keywords():
    """run --ray --reasoning-parser qwen3 --default-chat-template-kwargs '{"enable_thinking": false}': a chat line
    without its own keywords has no thinking to split, as the single-machine job reads it."""
    import json

    from batchllm.io.ingest import ResponseShape
    from batchllm.ray.jsonl_job import DUPLICATE, LINE, RAW, RECORD, _CliRecords
    from batchllm.request_output import CompletionOutput, RequestOutput

    raw = json.dumps({"custom_id": "c", "url": "/v1/chat/completions",
                      "body": {"messages": [{"role": "user", "content": "Hi"}]}}).encode()
    row = {RAW: raw, LINE: 1, DUPLICATE: False}
    output = RequestOutput("r", "p", [1], None,
                           [CompletionOutput(0, "a</think>b", [5], -1.0, None, finish_reason="stop")])
    for defaults, reasoning, content in ((None, "a", "b"), ({"enable_thinking": False}, None, "a</think>b")):
        names = ResponseShape("m", serving=LineServing(defaults, reasoning_parser="qwen3"))
        records = _CliRecords(names, "openai").with_tokenizer(None)
        message = json.loads(records(row, output, None)[RECORD])["response"]["body"]["choices"][0]["message"]
        assert (message["reasoning"], message["content"]) == (reasoning, content), defaults


def test_a_row_asking_for_inputs_the_engine_has_not_fails_alone():
    """A preprocess giving vLLM's multi_modal_data or lora_request ran the row without them, as a success."""
    rows = [{"prompt": "Hi", "multi_modal_data": {"image": "x.png"}}, {"prompt": "Hi", "lora_request": None}]
    table = pa.table({"i": [0, 1]})
    out = tokenize_batch(table, config=ProcessorConfig(), preprocess=lambda row: rows[row["i"]], num_buckets=1)
    errors = out.column(ERROR).to_pylist()
    assert errors[1] is None
    assert "a row: unsupported field(s): 'multi_modal_data' (vLLM's, not supported here" in errors[0]


def test_a_template_that_needs_a_user_message_runs_a_system_and_user_row():
    """The prefix key's hint renders the row's conversation before its last message; a template that refuses a
    conversation without a user message (Qwen3's do) failed every [system, user] row there, where the
    single-machine path and vLLM run it."""
    template = ("{% if not (messages | selectattr('role', 'equalto', 'user') | list) %}"
                "{{ raise_exception('No user query found in messages.') }}{% endif %}"
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
            {"messages": [{"role": "system", "content": "Be brief."}]}]
    table = pa.table({"i": [0, 1]})
    out = tokenize_batch(table, config=ProcessorConfig(engine_kwargs={"chat_template": template}),
                         preprocess=lambda row: rows[row["i"]], num_buckets=1)
    errors = out.column(ERROR).to_pylist()
    assert errors[0] is None
    assert "No user query found in messages" in errors[1]  # (the row's own conversation still fails by name)


def test_a_row_reads_token_ids_with_their_text_and_add_special_tokens_as_a_plain_line_does(tiny_model_factory,
                                                                                           tmp_path):
    """A row with both "prompt" and "prompt_token_ids" was refused ("a row needs exactly one of ...") and a row's
    "add_special_tokens" was not read (false still got the BOS), where a plain JSONL line runs the ids and keeps
    the text, and tokenizes with or without special tokens as asked. Rows now follow the lines' rules, in both
    a preprocess's rows and run --ray's lines."""
    import json

    from batchllm.inputs import prompt_processor_for
    from batchllm.ray.jsonl_job import DUPLICATE, LINE, RAW, _CliPreprocess
    from batchllm.ray.stages import TOKENS
    from tests.unit.test_vllm_port_api import _with_bos

    model = _with_bos(tiny_model_factory("llama"), tmp_path)
    tokenizer = prompt_processor_for(model).tokenizer
    plain = tokenizer("The sky is", add_special_tokens=False)["input_ids"]
    rows = [{"prompt": "not these words", "prompt_token_ids": [5, 6, 7]},
            {"prompt": "The sky is", "add_special_tokens": False}, {"prompt": "The sky is"},
            {"prompt": "The sky is", "add_special_tokens": None, "prompt_token_ids": None},
            {"prompt_token_ids": [5, 6], "add_special_tokens": True},
            {"prompt": "The sky is", "add_special_tokens": "no"},
            {"prompt": [1, 2], "prompt_token_ids": [5, 6]},
            {"prompt": "x", "messages": [{"role": "user", "content": "Hi"}]}]
    table = pa.table({"i": list(range(len(rows)))})
    out = tokenize_batch(table, config=ProcessorConfig(model=model), preprocess=lambda row: rows[row["i"]],
                         num_buckets=1)
    assert out.column(TOKENS).to_pylist()[:5] == [[5, 6, 7], plain, [1, *plain], [1, *plain], [5, 6]]
    assert out.column(ERROR).to_pylist() == [None] * 5 + [
        "'add_special_tokens' must be true or false, got 'no'",
        "a row: 'prompt' beside 'prompt_token_ids' must be a string (the ids' text); it gives prompt, "
        "prompt_token_ids",
        "a row: needs exactly one of prompt, messages, prompt_token_ids (or 'prompt_token_ids' with its 'prompt' "
        "text); it gives prompt, messages"]
    lines = [{"id": "a", "prompt": "The sky is", "add_special_tokens": False},
             {"id": "b", "prompt": "seven", "prompt_token_ids": [7]}]
    table = pa.table({RAW: [json.dumps(x).encode() for x in lines], LINE: [1, 2], DUPLICATE: [False] * 2})
    out = tokenize_batch(table, config=ProcessorConfig(model=model), preprocess=_CliPreprocess({}, None),
                         num_buckets=1)
    assert out.column(ERROR).to_pylist() == [None, None] and out.column(TOKENS).to_pylist() == [plain, [7]]


def test_a_forced_tool_call_rows_own_constraint_that_does_not_compile_fails_the_row_as_run_fails_its_line():
    """run --ray let a "required" tool_choice line whose own structured_outputs (replaced by the call's) does not
    compile run, where run fails that line in ingest: the row stage compiles it too, and the record says so in
    run's words; a line beside it runs."""
    import json

    pytest.importorskip("xgrammar")
    from batchllm.io.ingest import ResponseShape
    from batchllm.ray.jsonl_job import DUPLICATE, LINE, RAW, RECORD, _CliPreprocess, _CliRecords

    tools = [{"type": "function", "function": {"name": "verdict", "parameters": {"type": "object"}}}]
    chat = {"messages": [{"role": "user", "content": "Hi"}], "tools": tools, "tool_choice": "required"}
    lines = [{"id": "a", **chat, "structured_outputs": {"regex": "("}},
             {"id": "b", **chat, "structured_outputs": {"regex": "x"}}]
    table = pa.table({RAW: [json.dumps(x).encode() for x in lines], LINE: [1, 2], DUPLICATE: [None, None]})
    out = tokenize_batch(table, config=ProcessorConfig(max_tokens=4),
                         preprocess=_CliPreprocess({"max_tokens": 4}, None), num_buckets=1)
    error, fine = out.column(ERROR).to_pylist()
    assert error.startswith("structured output: the regex cannot be compiled") and fine is None, (error, fine)
    record = json.loads(_CliRecords(ResponseShape("m"), "jsonl")(out.slice(0, 1).to_pylist()[0], None, error)[RECORD])
    assert record == {"id": "a", "error": {"line": 1, "message": f"line 1: {error}"}}


def test_an_openai_rows_truncation_and_min_tokens_are_checked_as_run_checks_its_lines():
    """`run` refuses an OpenAI line whose truncate_prompt_tokens passes what the context leaves beside the max_tokens
    vLLM's server checks (`max_tokens_to_fit`: a completion's default 16 too), or whose min_tokens passes the most it
    may generate; `run --ray` ran both (its rows checked the truncation only with their own max_tokens). A plain
    row still runs, and so does an OpenAI chat row without max_tokens (checked beside 0, as vLLM checks it)."""
    from batchllm.ray.stages import FIT_MAX_TOKENS, OPENAI_LIMITS

    openai = {OPENAI_LIMITS: True}
    rows = [{"prompt": "Hi", "sampling_params": {"max_tokens": 16, "truncate_prompt_tokens": 60}, **openai,
             FIT_MAX_TOKENS: 16},
            {"prompt": "Hi", "sampling_params": {"max_tokens": 16, "truncate_prompt_tokens": 60}},
            {"prompt": "word " * 40, "sampling_params": {"min_tokens": 30}, **openai},
            {"prompt": "word " * 40, "sampling_params": {"min_tokens": 30}},
            {"prompt": "Hi", "sampling_params": {"max_tokens": 16, "truncate_prompt_tokens": 48}, **openai,
             FIT_MAX_TOKENS: 16},
            {"prompt": "Hi", "sampling_params": {"max_tokens": 20, "truncate_prompt_tokens": 60}, **openai,
             FIT_MAX_TOKENS: None},
            {"prompt": "word " * 40, "sampling_params": {"min_tokens": 10, "max_tokens": 8}, **openai}]
    table = pa.table({"i": list(range(len(rows)))})
    out = tokenize_batch(table, config=ProcessorConfig(max_model_len=64, max_tokens=None),
                         preprocess=lambda row: rows[row["i"]], num_buckets=1)
    errors = out.column(ERROR).to_pylist()
    assert errors[0] == ("truncate_prompt_tokens=60 cannot be greater than max_model_len - max_tokens = 48: ask a "
                         "smaller truncation size (or -1: what the context leaves)")
    assert errors[2] is not None and errors[2].startswith("min_tokens must be <= max_tokens ("), errors[2]
    assert errors[1] is None and errors[3] is None and errors[4] is None and errors[5] is None, errors
    assert errors[6] is not None and "min_tokens" in errors[6], "(SamplingParams' own check: 10 > 8)"


def test_a_row_names_the_max_tokens_its_prompt_must_fit():
    """The CLI's OpenAI lines pass the max_tokens vLLM's server checks (their own before a --generation-config cap,
    or a completion's default 16): a row whose own 30 passes the context fails, though it runs capped at 5. A
    preprocess's must-fit flag is any true value (1, numpy's True), as before."""
    import numpy as np

    from batchllm.ray.stages import FIT_MAX_TOKENS, MUST_FIT

    rows = [{"prompt": "word " * 40, "sampling_params": {"max_tokens": 5}, FIT_MAX_TOKENS: 30},
            {"prompt": "word " * 40, "sampling_params": {"max_tokens": 5}, FIT_MAX_TOKENS: 16},
            {"prompt": "word " * 40, "sampling_params": {"max_tokens": 30}, MUST_FIT: 1},
            {"prompt": "word " * 40, "sampling_params": {"max_tokens": 30}, MUST_FIT: np.bool_(True)},
            {"prompt": "word " * 40, "sampling_params": {"max_tokens": 30}, MUST_FIT: True, FIT_MAX_TOKENS: None},
            {"prompt": "word " * 40, "sampling_params": {"max_tokens": 30}, FIT_MAX_TOKENS: 30.0}]
    table = pa.table({"i": list(range(len(rows)))})
    out = tokenize_batch(table, config=ProcessorConfig(max_model_len=64),
                         preprocess=lambda row: rows[row["i"]], num_buckets=1)
    errors = out.column(ERROR).to_pylist()
    assert errors[0] is not None and "30 for the completion" in errors[0] and errors[1] is None, errors
    assert all(e is not None and "30 for the completion" in e for e in errors[2:5]), errors
    assert errors[5] is None, "a count that is no integer is not one (a user's column of that name)"
