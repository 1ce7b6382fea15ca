"""`llm.model_config` and `llm.llm_engine` as vLLM scripts read them (`batchllm.llm_engine`): values the
engine runs with, every automatic one resolved."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoConfig

from batchllm import RequestOutput, SamplingParams


def test_the_model_config_is_the_models_and_the_engines(default_llm, default_model_dir):
    mc = default_llm.model_config
    hf = AutoConfig.from_pretrained(default_model_dir)
    assert mc.max_model_len == 2048 and mc.dtype == torch.float32 and mc.quantization is None
    assert (mc.get_vocab_size(), mc.get_hidden_size(), mc.get_total_num_hidden_layers(), mc.get_num_layers()) == \
        (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_hidden_layers)
    assert (mc.get_num_attention_heads(), mc.get_total_num_kv_heads(), mc.get_head_size()) == \
        (hf.num_attention_heads, hf.num_key_value_heads, hf.hidden_size // hf.num_attention_heads)
    assert mc.architecture == "LlamaForCausalLM" and mc.architectures == list(hf.architectures)
    assert mc.hf_config.to_dict() == hf.to_dict()
    assert mc.runner_type == "generate" and not mc.is_multimodal_model
    assert default_llm.llm_engine.model_config is mc
    assert default_llm.llm_engine.get_tokenizer() is default_llm.get_tokenizer() is default_llm.llm_engine.tokenizer
    assert default_llm.get_world_size() == 1


def test_heads_per_rank_follow_the_parallel_config(default_llm):
    class Parallel:
        tensor_parallel_size = 3

    mc = default_llm.model_config  # SmolLM2: 9 query heads, 3 key/value heads
    assert (mc.get_num_attention_heads(Parallel()), mc.get_num_kv_heads(Parallel())) == (3, 1)
    Parallel.tensor_parallel_size = 9
    assert mc.get_num_kv_heads(Parallel()) == 1, "a head is replicated over ranks that outnumber the heads"


def test_resolved_settings_and_sampling_defaults(tmp_path, tiny_model_factory):
    from batchllm import LLM

    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory("qwen3"), model)
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_k": 20, "eos_token_id": 2}))
    llm = LLM(str(model), device="cpu", quantization="fp8", seed=None)
    try:
        mc = llm.model_config
        assert mc.max_model_len == 1024, "the model's own context where none was asked"
        assert mc.quantization == "fp8" and mc.is_quantized and mc.dtype == torch.float32
        assert isinstance(mc.seed, int) and mc.seed == llm.config.model.seed, "the seed drawn for None"
        assert mc.get_diff_sampling_param() == {"temperature": 0.6, "top_k": 20}
        generation = mc.try_get_generation_config()  # vLLM's: the file's non-default fields, its EOS ids too
        assert {k: generation[k] for k in ("temperature", "top_k", "eos_token_id")} == {
            "temperature": 0.6, "top_k": 20, "eos_token_id": 2}
        (model / "generation_config.json").write_text("{}")  # transformers' defaults: none of config.json's ids
        assert "eos_token_id" not in mc.try_get_generation_config()
        (model / "generation_config.json").unlink()  # none: transformers' from config.json, as vLLM falls back
        assert "temperature" not in mc.try_get_generation_config()
        assert mc.try_get_generation_config()["eos_token_id"] == json.loads((model / "config.json").read_text())[
            "eos_token_id"]
        assert mc.get_head_size() == 32 and mc.model == str(model) and mc.get_sliding_window() is None
    finally:
        llm.shutdown()


def test_unfinished_requests_are_counted_while_a_call_runs(default_llm):
    engine = default_llm.llm_engine
    prompts = [default_llm.tokenize_prompt(p) for p in ("The sky is", "One, two,")]
    params = [SamplingParams(max_tokens=1, temperature=0), SamplingParams(max_tokens=12, temperature=1.0, n=2,
                                                                          ignore_eos=True)]
    assert not engine.has_unfinished_requests()
    running = default_llm.iter_generate(prompts, params, use_tqdm=False)
    index, _ = next(running)
    assert index == 0 and engine.get_num_unfinished_requests() == 2, "the other prompt's two completions"
    running.close()
    assert engine.get_num_unfinished_requests() == 0 and not engine.has_unfinished_requests()


def test_what_is_not_offered_is_named(default_llm):
    with pytest.raises(AttributeError, match="add_request is not offered.*model_config"):
        default_llm.llm_engine.add_request("0", "Hi", SamplingParams())


def test_enqueued_prompts_run_as_one_batch_in_request_id_order(default_llm):
    """vLLM 0.26's enqueue / enqueue_chat / wait_for_completion (scripts using them failed with AttributeError):
    everything queued is planned as one batch, so a prefix shared across enqueue calls is computed once."""
    system = "You are a careful assistant who answers every question in one short sentence. " * 3
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
             for q in ("Name a colour.", "What is 2+2?", "Say hi.")]
    greedy = SamplingParams(temperature=0, max_tokens=6)
    expected = default_llm.chat(chats, greedy, use_tqdm=False)
    plain = default_llm.generate(["The capital of France is"], greedy, use_tqdm=False)[0]
    first = default_llm.enqueue_chat(chats[:2], greedy)
    second = default_llm.enqueue("The capital of France is", greedy)
    third = default_llm.enqueue_chat(chats[2], greedy, use_tqdm=False)
    ids = first + second + third
    assert len(set(ids)) == 4 and [int(i) for i in ids] == sorted(int(i) for i in ids)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        default_llm.enqueue(["fine", ""], greedy)  # a bad prompt queues none of its call's prompts
    assert default_llm.llm_engine.get_num_unfinished_requests() == 4, "queued, as vLLM's engine holds them"
    outputs = default_llm.wait_for_completion(use_tqdm=False)
    assert not default_llm.llm_engine.has_unfinished_requests()
    assert [o.request_id for o in outputs] == ids
    assert [o.outputs[0].token_ids for o in outputs] == \
        [e.outputs[0].token_ids for e in expected[:2]] + [plain.outputs[0].token_ids, expected[2].outputs[0].token_ids]
    stats = default_llm.last_stats
    assert stats["num_requests"] == 4 and stats["num_groups"] >= 1, "the three chats shared their system prompt"
    assert sum(o.num_cached_tokens for o in outputs) > 2 * len(default_llm.get_tokenizer()(system)["input_ids"])
    assert default_llm.wait_for_completion() == [], "the queue was emptied"
    assert int(default_llm.generate(["Hi"], greedy, use_tqdm=False)[0].request_id) > int(ids[-1])
    with pytest.raises(TypeError, match="RequestOutputs"):
        default_llm.wait_for_completion(int)


def test_apply_model_runs_on_the_engines_module_and_missing_methods_say_what_to_do(default_llm):
    hf = AutoConfig.from_pretrained(default_llm.model_config.model_dir)
    counts = default_llm.apply_model(lambda model: sum(p.numel() for p in model.parameters()))
    assert len(counts) == 1 and counts[0] > hf.vocab_size * hf.hidden_size
    for name, instead in (("start_profile", "bench --profile-out"), ("get_metrics", "last_stats"),
                          ("collective_rpc", "apply_model")):
        with pytest.raises(AttributeError, match=f"LLM.{name} is not offered: .*{instead}"):
            getattr(default_llm, name)()
        assert not hasattr(default_llm, name)
    with pytest.raises(AttributeError, match="'LLM' object has no attribute 'no_such_thing'"):
        default_llm.no_such_thing  # noqa: B018


def test_engine_args_as_vllms_examples_use_them(tiny_model_factory):
    """vLLM's basic examples build their command line with EngineArgs.add_cli_args and pass vars(args) to LLM;
    others go through EngineArgs.from_cli_args and dataclasses.asdict (`from batchllm import EngineArgs` failed)."""
    import argparse
    import dataclasses

    from batchllm import LLM, EngineArgs
    from batchllm.options import engine_config

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    parser.set_defaults(model=tiny_model_factory("llama"))
    parser.add_argument("--max-tokens", type=int)
    args = parser.parse_args(["--device", "cpu", "--max-model-len", "96", "--max-tokens", "3", "--async-scheduling",
                              "--no-enable-prefix-caching"])
    engine_args = EngineArgs.from_cli_args(args)
    assert (engine_args.max_model_len, engine_args.async_scheduling, engine_args.prefix_sharing) == (96, True, False)
    assert engine_args.block_size is None, "the declared defaults"
    kwargs = vars(args)
    max_tokens = kwargs.pop("max_tokens")
    expected = engine_config(**dataclasses.asdict(engine_args))
    for build in (lambda: LLM(**kwargs), lambda: LLM.from_engine_args(engine_args)):
        llm = build()
        try:
            assert llm.model_config.max_model_len == 96 and llm.config == expected
            out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                               use_tqdm=False)
            assert len(out[0].outputs[0].token_ids) == 3
        finally:
            llm.shutdown()
    with pytest.raises(TypeError, match="engine option 'max_model_len' must be an integer"):
        EngineArgs(max_model_len="4k")
    vllms = EngineArgs(enable_prefix_caching=False, kv_cache_memory_bytes=3 << 29)  # vLLM's names, as its examples
    assert (vllms.prefix_sharing, vllms.kv_cache_memory_gib, vllms.enable_prefix_caching) == (False, 1.5, False)
    assert vllms.kv_cache_memory_bytes == 3 << 29, "vLLM's names read back as given, as vLLM's EngineArgs"
    assert engine_config(**dataclasses.asdict(vllms)).cache.kv_cache_memory_gib == 1.5
    # vLLM's fields without effect here are taken, and read (vLLM's throughput script reads enable_lora)
    quiet = EngineArgs(disable_log_stats=True, swap_space=4, enable_lora=False, served_model_name="m")
    assert quiet.enable_lora is False and engine_config(**dataclasses.asdict(quiet)) == engine_config()
    assert vars(EngineArgs.add_cli_args(argparse.ArgumentParser()).parse_args(["--swap-space", "4"]))["swap_space"] == 4
    with pytest.raises(TypeError, match="max_loras=2 is not supported: LoRA"):
        EngineArgs(max_loras=2)


def test_vllms_pause_around_enqueue_is_taken_and_a_shut_down_llm_says_so(tiny_model_factory):
    """vLLM 0.26's scripts pause scheduling around enqueue (sleep(level=0) ... wake_up(tags=["scheduling"])): sleep
    was refused. After shutdown, wait_for_completion returned [] (dropping what was queued) and apply_model blamed
    data parallelism."""
    from batchllm import LLM

    llm = LLM(tiny_model_factory("llama"), device="cpu", skip_tokenizer_init=True)
    llm.sleep(level=0, mode="abort")
    ids = llm.enqueue({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2, ignore_eos=True))
    llm.wake_up(tags=["scheduling"])
    assert [o.request_id for o in llm.wait_for_completion(output_type=RequestOutput)] == ids
    with pytest.raises(ValueError, match=r"sleep\(level=1\) is not offered: shutdown\(\) frees"):
        llm.sleep()
    llm.enqueue({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=2))
    llm.shutdown()
    for call in (llm.wait_for_completion, lambda: llm.apply_model(len)):
        with pytest.raises(RuntimeError, match="this LLM was shut down"):
            call()
