"""What a vLLM 0.26 script ported to `batchllm.LLM` / `EngineArgs` meets: seeds, prompt types, tokenization keywords,
the EngineArgs parser and vLLM's EngineArgs field names."""

import dataclasses
import json
import logging
import re
import shutil

import pytest

from batchllm import SamplingParams


def test_an_engine_seed_of_none_is_zero_with_a_warning(tiny_model_factory, caplog):
    """LLM(seed=None) drew a random seed, so two runs of one script sampled differently; vLLM V1 read None as 0
    ("impossible to un-specify a seed") and 0.26 refuses it. None is now 0, said in a warning."""
    from batchllm import LLM
    from batchllm.config import ModelConfig
    from batchllm.options import engine_config

    with caplog.at_level(logging.WARNING, logger="batchllm"):
        assert ModelConfig(seed=None).seed == 0
    assert "seed=None is taken as seed=0" in caplog.text and "vLLM" in caplog.text
    assert engine_config(seed=None) == engine_config() == engine_config(seed=0)
    model = tiny_model_factory("llama")
    sampled = []
    for seed in (None, None, 0):
        llm = LLM(model, device="cpu", dtype="float32", max_model_len=64, seed=seed)
        try:
            out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
        finally:
            llm.shutdown()
        sampled.append(out[0].outputs[0].token_ids)
    assert sampled[0] == sampled[1] == sampled[2], "an unseeded request samples alike in every run"


def test_a_bytes_prompt_is_refused_not_read_as_token_ids(tiny_model_factory):
    """llm.generate(Path(f).read_bytes()) ran the file's byte values as token ids (any iterable of ints was one
    token prompt); vLLM raises a TypeError for a prompt that is no str, dict or list of ints."""
    from batchllm import LLM

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=64)
    try:
        for data in (b"The capital of France is", bytearray(b"hi"), memoryview(b"hi")):
            with pytest.raises(TypeError, match=r"decode the bytes first .*data\.decode\('utf-8'\)"):
                llm.generate(data, SamplingParams(max_tokens=2), use_tqdm=False)
        with pytest.raises(ValueError, match="prompt 1: .*got bytes \\(decode the bytes to a str first\\)"):
            llm.generate(["a", b"b"], SamplingParams(max_tokens=2), use_tqdm=False)
        assert llm.generate([104, 105], SamplingParams(max_tokens=2), use_tqdm=False)[0].prompt_token_ids == [104, 105]
    finally:
        llm.shutdown()


def _with_bos(model: str, tmp_path) -> str:
    """A copy of a tiny model whose tokenizer puts its BOS (<|im_start|>, id 1) before every text, as Llama's do."""
    copy = tmp_path / "bos"
    shutil.copytree(model, copy)
    spec = json.loads((copy / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                                 {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<|im_start|>"}))
    return str(copy)


def test_tokenization_kwargs_add_special_tokens_is_taken_as_vllm_takes_it(tiny_model_factory, tmp_path):
    """tokenization_kwargs={"add_special_tokens": False} (vLLM's control) and True were refused, saying prompts are
    "tokenized as the model's tokenizer does", which a BOS-prefixed text is not. Either is now honoured as vLLM
    honours it; the default (no second BOS before a text that opens with it) is unchanged."""
    from batchllm import LLM

    llm = LLM(_with_bos(tiny_model_factory("llama"), tmp_path), device="cpu", dtype="float32", max_model_len=64)
    tok = llm.get_tokenizer()
    sp = SamplingParams(max_tokens=1, temperature=0)

    def ids(prompt, **kwargs):
        return llm.generate(prompt, sp, use_tqdm=False, **kwargs)[0].prompt_token_ids

    try:
        bos, text = 1, "The sky is"
        plain = tok(text, add_special_tokens=False)["input_ids"]
        assert ids(text) == [bos, *plain] and ids(tok.bos_token + text) == [bos, *plain], "the default is kept"
        assert ids(text, tokenization_kwargs={"add_special_tokens": False}) == plain
        assert ids(tok.bos_token + text, tokenization_kwargs={"add_special_tokens": True}) == [bos, bos, *plain]
        assert ids([5, 6], tokenization_kwargs={"add_special_tokens": True}) == [5, 6], "token ids are kept"
        chat = [{"role": "user", "content": "Hi"}]
        rendered = llm.chat(chat, sp, use_tqdm=False)[0].prompt_token_ids
        assert llm.chat(chat, sp, use_tqdm=False, tokenization_kwargs={"add_special_tokens": False})[0] \
            .prompt_token_ids == rendered, "vLLM's chat default"
        with pytest.raises(ValueError, match="add_special_tokens must be True or False, got 'no'"):
            ids(text, tokenization_kwargs={"add_special_tokens": "no"})
        with pytest.raises(ValueError, match="'max_length' not supported: only truncate_prompt_tokens, "
                                             "truncation_side 'left' and add_special_tokens are taken"):
            ids(text, tokenization_kwargs={"max_length": 3})
    finally:
        llm.shutdown()


def test_a_plain_lines_add_special_tokens_is_taken_as_generates_tokenization_kwargs(tiny_model_factory, tmp_path):
    """A plain JSONL line's "add_special_tokens" was ignored (named only among the ignored fields), so
    `"add_special_tokens": false` still got the BOS that LLM.generate(tokenization_kwargs=...) leaves out. It now
    tokenizes the line's text or rendered chat as that keyword does; a value other than true or false fails its line."""
    from batchllm.inputs import prompt_processor_for
    from batchllm.io.ingest import prepare_lines

    model = _with_bos(tiny_model_factory("llama"), tmp_path)
    processor = prompt_processor_for(model)
    bos, text = 1, "The sky is"
    plain = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    chat = [{"role": "user", "content": "Hi"}]
    rendered = processor.tokenizer(processor.apply_chat_template(chat, 0), add_special_tokens=False)["input_ids"]
    lines = [{"id": "off", "prompt": text, "add_special_tokens": False}, {"id": "on", "prompt": text},
             {"id": "twice", "prompt": "<|im_start|>" + text, "add_special_tokens": True},
             {"id": "chat", "messages": chat, "add_special_tokens": True},
             {"id": "ids", "prompt_token_ids": [5, 6], "add_special_tokens": True},
             {"id": "bad", "prompt": text, "add_special_tokens": "no"},
             {"id": "off-cut", "prompt": text, "add_special_tokens": False, "truncate_prompt_tokens": 2}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    valid, errors, _, ignored = prepare_lines(tmp_path / "in.jsonl", processor, {"max_tokens": 2}, None, chunk=4)
    got = {v.line.request_id: v.prompt.token_ids.tolist() for v in valid}
    assert got == {"off": plain, "on": [bos, *plain], "twice": [bos, bos, *plain], "chat": [bos, *rendered],
                   "ids": [5, 6], "off-cut": plain[-2:]}
    [error] = errors
    assert error.request_id == "bad" and "'add_special_tokens' must be true or false, got 'no'" in error.message
    assert "add_special_tokens" not in ignored


def test_truncating_a_bos_prompt_to_k_tokens_gives_hfs_left_truncation_for_every_k(tiny_model_factory, tmp_path):
    """vLLM truncates a text prompt in the tokenizer (truncation_side left, max_length k), which keeps the BOS it adds:
    k = 1 gives the BOS alone. It gave the last text token here (the BOS was kept only from k = 2)."""
    from transformers import AutoTokenizer

    from batchllm.inputs import prompt_processor_for

    model = _with_bos(tiny_model_factory("llama"), tmp_path)
    processor = prompt_processor_for(model)
    hf = AutoTokenizer.from_pretrained(model)
    hf.truncation_side = "left"
    text = "one two three four five six"
    for k in (1, 2, 3, 100):
        expected = hf(text, truncation=True, max_length=k)["input_ids"]
        assert processor.tokenize_prompt(text, 0, k).token_ids == expected, k
        assert processor.tokenize_many([text], [0], [k])[0].token_ids == expected, k
    assert processor.tokenize_prompt(text, 0, 1).token_ids == [1]
    assert processor.tokenize_prompt([5, 6, 7], 0, 1).token_ids == [7], "token ids have no BOS to keep"


def test_chat_given_a_text_or_a_message_names_what_a_conversation_is_and_what_was_given(tiny_model_factory):
    """llm.chat("hello") said "conversation 0: messages must be a non-empty list" (the text's characters became
    conversations); it now says what chat takes and what it was given, as does a bad conversation or message."""
    from batchllm import LLM

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=64)
    what = re.escape('a conversation is a non-empty list of message dicts ({"role": ..., "content": ...}), got ')
    try:
        with pytest.raises(ValueError, match="^chat takes a conversation or a list of conversations: " + what
                           + "str 'hello'$"):
            llm.chat("hello", use_tqdm=False)
        one_message = re.escape("dict {'role': 'user'} (one message: wrap it in a list)")
        with pytest.raises(ValueError, match=what + one_message):
            llm.chat({"role": "user"}, use_tqdm=False)
        with pytest.raises(ValueError, match="^conversation 1: " + what + "an empty list$"):
            llm.chat([[{"role": "user", "content": "hi"}], []], use_tqdm=False)
        with pytest.raises(ValueError, match=re.escape("conversation 0: message 1 must be an object with a 'role' "
                                                       "(and its 'content'), got str 'and you'")):
            llm.chat([{"role": "user", "content": "hi"}, "and you"], use_tqdm=False)
    finally:
        llm.shutdown()


def test_chat_takes_a_name_of_the_tokenizers_templates_and_a_template_in_its_keywords_as_vllms(tiny_model_factory):
    """llm.chat(conv, chat_template="tool_use") was refused as "neither a file nor a Jinja template" where the
    tokenizer holds named templates; vLLM's renderer resolves the name (`tokenizer.get_chat_template`). A name the
    tokenizer lacks is still refused by name, and Jinja text still renders; a template in chat_template_kwargs
    serves where the argument gives none."""
    from batchllm import LLM, SamplingParams

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=16)
    try:
        llm.prompts.tokenizer.chat_template = {
            "default": "{% for m in messages %}D:{{ m.content }}{% endfor %}",
            "tool_use": "{% for m in messages %}T:{{ m.content }}{% endfor %}"}
        chat, one = [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1)
        prompts = {name: llm.chat(chat, one, use_tqdm=False, chat_template=name)[0].prompt
                   for name in (None, "tool_use", "default", "{% for m in messages %}J:{{ m.content }}{% endfor %}")}
        assert list(prompts.values()) == ["D:hi", "T:hi", "D:hi", "J:hi"], prompts
        with pytest.raises(ValueError, match="chat_template 'tool_usage' is neither a file nor a Jinja template"):
            llm.chat(chat, one, use_tqdm=False, chat_template="tool_usage")
        in_kwargs = {"chat_template": "{% for m in messages %}K:{{ m.content }}{% endfor %}", "tokenize": True}
        assert llm.chat(chat, one, use_tqdm=False, chat_template_kwargs=in_kwargs)[0].prompt == "K:hi", (
            "vLLM's LLM.chat takes chat_template_kwargs' template (and overrides tokenize): both were refused")
        assert llm.chat(chat, one, use_tqdm=False, chat_template="tool_use", chat_template_kwargs=in_kwargs
                        )[0].prompt == "T:hi", "the argument wins"
    finally:
        llm.shutdown()


def test_a_priority_list_of_another_length_than_the_prompts_is_refused(tiny_model_factory):
    """generate(["a", "b"], priority=[0]) was taken (the second prompt given no priority); vLLM refuses a per-prompt
    list whose length differs from the prompts', as it refuses such a sampling_params list."""
    from batchllm import LLM

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=64)
    sp = SamplingParams(max_tokens=1)
    try:
        for priority, given in (([0], 1), ([0, 0, 0], 3), ([], 0)):
            with pytest.raises(ValueError, match=rf"the lengths of prompts \(2\) and priority \({given}\) must be"):
                llm.generate(["a", "b"], sp, use_tqdm=False, priority=priority)
        with pytest.raises(ValueError, match=r"prompts \(2\) and lora_request \(1\)"):
            llm.generate(["a", "b"], sp, use_tqdm=False, lora_request=[None])
        with pytest.raises(ValueError, match=r"prompts \(1\) and priority \(2\)"):
            llm.enqueue([5, 6], sp, priority=[0, 0])  # one prompt of token ids
        with pytest.raises(TypeError, match="priority must be a list"):
            llm.generate(["a", "b"], sp, use_tqdm=False, priority=0)
        assert len(llm.generate(["a", "b"], sp, use_tqdm=False, priority=[0, 0], lora_request=[None, None])) == 2
    finally:
        llm.shutdown()


# vLLM 0.26.0's `EngineArgs` fields (vllm/engine/arg_utils.py, in declaration order) and their defaults (a config
# object's default factory written as {}; model's default is vLLM's, not taken here)
VLLM_026_ENGINE_ARGS = {
    "model": "Qwen/Qwen3-0.6B", "enable_return_routed_experts": False, "model_weights": "", "served_model_name": None,
    "tokenizer": None, "hf_config_path": None, "runner": "auto", "convert": "auto", "skip_tokenizer_init": False,
    "enable_prompt_embeds": False, "tokenizer_mode": "auto", "trust_remote_code": False,
    "allowed_local_media_path": "", "allowed_media_domains": None, "download_dir": None,
    "safetensors_load_strategy": None, "safetensors_prefetch_num_threads": 8,
    "safetensors_prefetch_block_size": 16777216, "load_format": "auto", "config_format": "auto", "dtype": "auto",
    "kv_cache_dtype": "auto", "seed": 0, "max_model_len": None, "cudagraph_capture_sizes": None,
    "max_cudagraph_capture_size": None, "ir_op_priority": {}, "distributed_executor_backend": None,
    "pipeline_parallel_size": 1, "master_addr": "127.0.0.1", "master_port": 29501, "nnodes": 1, "node_rank": 0,
    "distributed_timeout_seconds": None, "cpu_distributed_timeout_seconds": None, "numa_bind": False,
    "numa_bind_nodes": None, "numa_bind_cpus": None, "device_ids": None, "tensor_parallel_size": 1,
    "prefill_context_parallel_size": 1, "decode_context_parallel_size": 1, "dcp_comm_backend": "ag_rs",
    "dcp_kv_cache_interleave_size": 1, "cp_kv_cache_interleave_size": 1, "data_parallel_size": 1,
    "data_parallel_rank": None, "data_parallel_start_rank": None, "data_parallel_size_local": None,
    "data_parallel_address": None, "data_parallel_rpc_port": None, "data_parallel_hybrid_lb": False,
    "data_parallel_external_lb": False, "data_parallel_multi_port_external_lb": False, "data_parallel_backend": "mp",
    "enable_expert_parallel": False, "enable_ep_weight_filter": False, "moe_backend": "auto", "linear_backend": "auto",
    "all2all_backend": "allgather_reducescatter", "enable_elastic_ep": False, "enable_dbo": False, "ubatch_size": 0,
    "dbo_decode_token_threshold": 32, "dbo_prefill_token_threshold": 512, "disable_nccl_for_dp_synchronization": None,
    "eplb_config": {}, "enable_eplb": False, "expert_placement_strategy": "linear", "_api_process_count": 1,
    "_api_process_rank": 0, "max_parallel_loading_workers": None, "block_size": None, "enable_prefix_caching": None,
    "prefix_caching_hash_algo": "sha256", "disable_sliding_window": False, "disable_cascade_attn": True,
    "offload_backend": "auto", "cpu_offload_gb": 0, "cpu_offload_params": set(), "offload_group_size": 0,
    "offload_num_in_group": 1, "offload_prefetch_step": 1, "offload_params": set(), "gpu_memory_utilization": 0.92,
    "kv_cache_memory_bytes": None, "max_num_batched_tokens": None, "max_num_scheduled_tokens": None,
    "max_num_partial_prefills": 1, "max_long_partial_prefills": 1, "long_prefill_token_threshold": 0,
    "max_num_seqs": None, "max_logprobs": 20, "logprobs_mode": "raw_logprobs", "use_fp64_gumbel": False,
    "disable_log_stats": False, "aggregate_engine_logging": False, "revision": None, "code_revision": None,
    "hf_token": None, "hf_overrides": {}, "model_class_overrides": {}, "tokenizer_revision": None,
    "quantization": None, "quantization_config": None, "allow_deprecated_quantization": False, "enforce_eager": False,
    "disable_custom_all_reduce": False, "language_model_only": False, "limit_mm_per_prompt": {},
    "enable_mm_embeds": False, "interleave_mm_strings": False, "media_io_kwargs": {}, "mm_processor_kwargs": None,
    "mm_processor_cache_gb": 4, "mm_processor_cache_type": "lru", "mm_shm_cache_max_object_size_mb": 128,
    "mm_encoder_only": False, "mm_encoder_tp_mode": "weights", "mm_encoder_attn_backend": None,
    "mm_encoder_attn_dtype": None, "mm_encoder_fp8_scale_path": None, "mm_encoder_fp8_scale_save_path": None,
    "mm_encoder_fp8_scale_save_margin": 1.5, "io_processor_plugin": None, "renderer_num_workers": 1,
    "skip_mm_profiling": False, "video_pruning_rate": None, "mm_tensor_ipc": "direct_rpc", "mm_ipc_gpu_memory_gb": 0,
    "enable_lora": False, "max_loras": 1, "max_lora_rank": 16, "default_mm_loras": None, "fully_sharded_loras": False,
    "max_cpu_loras": None, "lora_dtype": "auto", "lora_target_modules": None, "enable_tower_connector_lora": False,
    "specialize_active_lora": False, "enable_mixed_moe_lora_format": False, "enable_moe_shared_loras": False,
    "ray_workers_use_nsight": False, "num_gpu_blocks_override": None, "model_loader_extra_config": {},
    "ignore_patterns": ["original/**/*"], "enable_chunked_prefill": None, "disable_chunked_mm_input": False,
    "scheduler_reserve_full_isl": True, "prefill_schedule_interval": 1, "watermark": 0.0,
    "disable_hybrid_kv_cache_manager": None, "structured_outputs_config": {}, "reasoning_parser": "",
    "reasoning_parser_plugin": None, "speculative_config": None, "spec_method": None, "spec_model": None,
    "spec_tokens": None, "diffusion_config": None, "show_hidden_metrics_for_version": None,
    "otlp_traces_endpoint": None, "collect_detailed_traces": None, "kv_cache_metrics": False,
    "kv_cache_metrics_sample": 0.01, "cudagraph_metrics": False, "enable_layerwise_nvtx_tracing": False,
    "enable_mfu_metrics": False, "enable_logging_iteration_details": False, "jit_monitor_mode": "warn",
    "jit_monitor_verbose": False, "enable_mm_processor_stats": False, "scheduling_policy": "fcfs",
    "scheduler_cls": None, "pooler_config": None, "compilation_config": {}, "attention_config": {}, "mamba_config": {},
    "kernel_config": {}, "enable_flashinfer_autotune": None, "enable_bf16x3_router_gemm": None, "worker_cls": "auto",
    "worker_extension_cls": "", "profiler_config": {}, "kv_transfer_config": None, "kv_events_config": None,
    "ec_transfer_config": None, "reasoning_config": None, "generation_config": "auto", "enable_sleep_mode": False,
    "enable_cumem_allocator": False, "override_generation_config": {}, "model_impl": "auto",
    "override_attention_dtype": None, "attention_backend": None, "calculate_kv_scales": False,
    "kv_cache_dtype_skip_layers": [], "mamba_cache_dtype": "auto", "mamba_ssm_cache_dtype": "auto",
    "mamba_block_size": None, "prefix_match_unit": None, "mamba_cache_mode": "none", "mamba_backend": "triton",
    "enable_mamba_cache_stochastic_rounding": False, "mamba_cache_philox_rounds": 0, "additional_config": {},
    "use_tqdm_on_load": True, "pt_load_map_location": "cpu", "logits_processors": None, "async_scheduling": None,
    "stream_interval": 1, "kv_sharing_fast_prefill": False, "optimization_level": 2, "performance_mode": "balanced",
    "kv_offloading_size": None, "kv_offloading_backend": "native", "tokens_only": False, "shutdown_timeout": 0,
    "weight_transfer_config": None, "fail_on_environ_validation": False, "gdn_prefill_backend": None,
}


def test_every_vllm_026_engine_args_field_is_taken_or_refused_with_a_reason():
    """Real EngineArgs keywords were "unknown engine option", some with a misleading "did you mean"
    (prefix_caching_hash_algo -> enable_prefix_caching, cuda_graph_sizes -> max_cudagraph_capture_size), others bare
    (worker_extension_cls, disable_cascade_attn, stream_interval ...); enable_chunked_prefill=None and
    attention_backend=None (vLLM's defaults) were refused. Every field is now an option here, a vLLM name of one, or
    taken at vLLM's default and refused otherwise with a reason; EngineArgs has each as a field."""
    from batchllm import EngineArgs
    from batchllm.options import (
        VLLM_ALIASES,
        VLLM_CONVERTED,
        VLLM_NO_EFFECT,
        VLLM_NOT_TAKEN,
        engine_config,
        engine_options,
    )

    assert len(VLLM_026_ENGINE_ARGS) == 221
    known = {*engine_options(), *VLLM_ALIASES, *VLLM_CONVERTED, *VLLM_NO_EFFECT, *VLLM_NOT_TAKEN}
    assert [name for name in VLLM_026_ENGINE_ARGS if name not in known] == []
    assert set(VLLM_026_ENGINE_ARGS) <= {f.name for f in dataclasses.fields(EngineArgs)}
    default = engine_config()
    for name, value in VLLM_026_ENGINE_ARGS.items():
        if name == "model":
            continue  # (vLLM's default model is not in this machine's cache)
        config = engine_config(**{name: value})  # (never "unknown engine option")
        if name not in engine_options():  # (an option's value is its own: gpu_memory_utilization 0.92 is taken)
            assert config == default, f"{name}={value!r}: vLLM's default asks for nothing"
    for name in VLLM_NOT_TAKEN.keys() & VLLM_026_ENGINE_ARGS.keys():
        with pytest.raises(TypeError, match=rf"^{name}=.* is not supported: .*\((Only|Taken:) vLLM's default, "):
            engine_config(**{name: ("a value", "no vLLM default is")})
    for name, value in (("prefix_caching_hash_algo", "sha256"), ("prefix_caching_hash_algo", "xxhash"),
                        ("disable_cascade_attn", False), ("cuda_graph_sizes", None)):
        assert engine_config(**{name: value}) == default
    with pytest.raises(TypeError, match="cuda_graph_sizes=.* not supported: decode batches up to "
                                        "max_cudagraph_capture_size run as CUDA graphs"):
        engine_config(cuda_graph_sizes=[1, 2, 4])
    with pytest.raises(TypeError, match="worker_extension_cls='my.Ext' is not supported: the engine's processes"):
        engine_config(worker_extension_cls="my.Ext")
    assert engine_config(num_gpu_blocks_override=12).cache.num_kv_blocks == 12, "vLLM's name of num_kv_blocks"


def test_engine_args_parser_takes_and_refuses_what_llm_does(capsys):
    """EngineArgs.add_cli_args' parser refused vLLM flags LLM(...) takes or explains (-pp 1, --enable-lora,
    --revision main, --hf-overrides {}, --compilation-config {...}, -O0) with a bare "unrecognized arguments". It
    now takes what LLM takes and refuses the rest with batchllm run's explanation; EngineArgs(enable_prefix_caching=
    False) reads back False (it read None), and LLM(compilation_config={}) (vLLM's default) is taken."""
    from batchllm import EngineArgs
    from batchllm.cli import main, vllm_flag_not_taken
    from batchllm.options import engine_config
    from batchllm.utils import FlexibleArgumentParser

    def parse(*words):
        parser = FlexibleArgumentParser(prog="script")
        EngineArgs.add_cli_args(parser)
        return parser.parse_args(list(words))

    default = engine_config()
    for words in (["--pipeline-parallel-size", "1"], ["-pp", "1"], ["--no-enable-lora"], ["--revision", "None"],
                  ["--hf-overrides", "{}"], ["--compilation-config", "{}"], ["-O2"], ["-O", "3"],
                  ["--optimization-level", "1"], ["--prefix-caching-hash-algo", "xxhash"],
                  ["--structured-outputs-config", '{"backend": "xgrammar"}'], ["--worker-extension-cls", ""]):
        args = parse(*words)
        assert engine_config(**vars(args)) == default, words
        assert engine_config(**dataclasses.asdict(EngineArgs.from_cli_args(args))) == default, words
    for words, flag in ((["--enable-lora"], "--enable-lora"), (["--revision", "main"], "--revision"),
                        (["-pp", "2"], "-pp"), (["-O0"], "-O"), (["--compilation-config", '{"level": 0}'],
                                                                  "--compilation-config"),
                        (["--hf-overrides", '{"a": 1}'], "--hf-overrides"), (["--stream-interval", "4"],
                                                                             "--stream-interval")):
        with pytest.raises(SystemExit):
            parse(*words)
        err = capsys.readouterr().err
        assert "is not supported: " + vllm_flag_not_taken(flag) in err and "unrecognized" not in err, words
    with pytest.raises(SystemExit):
        main(["run", "in.jsonl", "-o", "out.jsonl", "-O0"])
    assert "argument --optimization-level/-O: 0 is not supported: nothing is compiled here" in capsys.readouterr().err
    assert EngineArgs(enable_prefix_caching=False).enable_prefix_caching is False
    assert EngineArgs(enable_prefix_caching=False).prefix_sharing is False
    assert EngineArgs(kv_cache_memory_bytes=2**30).kv_cache_memory_bytes == 2**30
    # parsed, vLLM's names read back what their flags set (they read None: every flag stores under its option)
    parsed = EngineArgs.from_cli_args(parse("--no-enable-prefix-caching", "--kv-cache-memory-bytes", "1G",
                                            "--num-gpu-blocks-override", "64"))
    assert (parsed.enable_prefix_caching, parsed.kv_cache_memory_bytes, parsed.num_gpu_blocks_override) == (
        False, 2**30, 64)
    assert (parsed.prefix_sharing, parsed.kv_cache_memory_gib, parsed.num_kv_blocks) == (False, 1.0, 64)
    unset = EngineArgs.from_cli_args(parse())
    assert (unset.enable_prefix_caching, unset.kv_cache_memory_bytes, unset.num_gpu_blocks_override) == (None,) * 3
    assert engine_config(**dataclasses.asdict(parsed)) == engine_config(
        prefix_sharing=False, kv_cache_memory_gib=1.0, num_kv_blocks=64)
    assert engine_config(compilation_config={}) == default
    with pytest.raises(TypeError, match="'enable_prefix_caching' and 'prefix_sharing' are the same option"):
        engine_config(enable_prefix_caching=False, prefix_sharing=True)


def test_vllms_run_batch_module_runs_an_openai_batch_file(tiny_model_factory, tmp_path, monkeypatch):
    """vLLM documents `python -m vllm.entrypoints.openai.run_batch -i IN -o OUT --model M`; ported, that module
    path did not exist here (ModuleNotFoundError). It is `batchllm run-batch` with the same arguments."""
    from batchllm.entrypoints.openai import run_batch

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                               "body": {"model": "m", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}}) + "\n")
    model = tiny_model_factory("llama")
    monkeypatch.setattr("sys.argv", ["run_batch.py", "-i", str(src), "-o", str(out), "--model", model,
                                     "--device", "cpu", "--dtype", "float32", "--no-progress"])
    assert run_batch.main() == 0
    record = json.loads(out.read_text())
    assert record["custom_id"] == "a" and record["error"] is None
    usage = record["response"]["body"]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (3, 3, 6)


def test_vllms_clean_up_and_port_helpers_are_importable_and_do_their_work():
    """vLLM's examples import `cleanup_dist_env_and_memory` (vllm.distributed, older: .parallel_state) and
    `get_open_port` (vllm.utils): all were import errors here. The clean-up collects what a dropped LLM left (its
    finalizers stop its processes); the port is one nothing listens on."""
    import gc
    import socket
    import weakref

    from batchllm.distributed import cleanup_dist_env_and_memory
    from batchllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    from batchllm.utils import get_open_port

    class Held:
        pass

    gc.disable()
    try:
        for clean_up in (cleanup_dist_env_and_memory, destroy_model_parallel, destroy_distributed_environment):
            held = Held()
            held.cycle = held  # (freed only by a collection)
            dropped = weakref.ref(held)
            del held
            assert dropped() is not None
            clean_up()
            assert dropped() is None, clean_up.__name__
    finally:
        gc.enable()
    port = get_open_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("", port))  # free: binding it works


def test_vllms_engine_module_paths_give_the_same_classes():
    """vLLM's examples import `from vllm.engine.arg_utils import EngineArgs` (and `vllm.engine.llm_engine`'s
    LLMEngine): a ModuleNotFoundError here while `batchllm.engine` was a module. They are now the same classes as
    `batchllm`'s, and an example's argparse round trip through them works."""
    import batchllm
    from batchllm.engine.arg_utils import EngineArgs
    from batchllm.engine.llm_engine import LLMEngine
    from batchllm.utils.argparse_utils import FlexibleArgumentParser

    assert EngineArgs is batchllm.EngineArgs and LLMEngine is batchllm.LLMEngine
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--max-model-len", "512", "--no-enable-prefix-caching"]))
    assert (args.max_model_len, args.enable_prefix_caching) == (512, False)


def test_outputs_built_positionally_as_vllms_and_its_logprobs_module_and_prompt_type_port():
    """Code written for vLLM 0.26 that builds outputs itself (a mock, results rebuilt from a cache) passes
    RequestOutput's arguments in vLLM's order, prompt_logprobs before outputs: here the completions landed in
    prompt_logprobs and `outputs` was None. CompletionOutput's finish_reason was required and its routed_experts,
    RequestOutput's num_cache_creation_tokens and ec_transfer_params unknown; `vllm.logprobs` and
    `vllm.PromptType` had no counterpart."""
    import batchllm
    from batchllm import CompletionOutput, RequestOutput
    from batchllm.logprobs import Logprob, PromptLogprobs, SampleLogprobs

    completion = CompletionOutput(0, "Paris", [5], -0.25, [{5: Logprob(-0.25, 1, "Paris")}])
    assert (completion.routed_experts, completion.finish_reason, completion.finished()) == (None, None, False)
    done = CompletionOutput(0, "Paris", [5], -0.25, None, None, "stop", ".")
    assert (done.finish_reason, done.stop_reason) == ("stop", ".")
    prompt_logprobs: PromptLogprobs = [None, {7: Logprob(-1.0, 2, "x")}]
    output = RequestOutput("0", "p", [6, 7], prompt_logprobs, [completion], False, None, None, None, None, 3, 0,
                           kv_transfer_params=None, ec_transfer_params=None)
    assert output.outputs == [completion] and output.prompt_logprobs is prompt_logprobs
    assert (output.finished, output.num_cached_tokens, output.num_cache_creation_tokens) == (False, 3, 0)
    with pytest.raises(TypeError):
        RequestOutput("0", "p", [6, 7], None, [completion], True, None, None, None, None, 3, 0, None)  # (keyword only)
    sample: SampleLogprobs = completion.logprobs
    assert Logprob is batchllm.Logprob and sample[0][5].decoded_token == "Paris"
    assert [f.name for f in dataclasses.fields(CompletionOutput)] == [
        "index", "text", "token_ids", "cumulative_logprob", "logprobs", "routed_experts", "finish_reason",
        "stop_reason", "lora_request"]
    from batchllm.inputs import PromptType

    assert batchllm.PromptType is PromptType and "PromptType" in batchllm.__all__


def test_vllms_step_engine_is_refused_by_name_and_a_second_call_finds_the_first_ones_kv(tiny_model_factory):
    """`from vllm import LLMEngine; LLMEngine.from_engine_args(...)` was an ImportError here, then a bare
    AttributeError: it now says the step API is not offered and what to call. vLLM's prefix-caching examples warm
    the cache with one call and time the next: the next call takes the KV the first left (prefix caching is on by
    default, as vLLM's), and computes the prompt again with enable_prefix_caching=False."""
    from batchllm import LLM, EngineArgs, LLMEngine

    with pytest.raises(NotImplementedError, match=r"LLMEngine \(add_request / step\) is not offered.*"
                                                  r"LLM\.from_engine_args\(engine_args\)"):
        LLMEngine.from_engine_args(EngineArgs())
    model = tiny_model_factory("llama")
    params = SamplingParams(max_tokens=2, temperature=0)
    prompt = [[5 + i % 50 for i in range(40)]]
    for asked, kept in ((True, 39), (None, 39), (False, 0)):  # (all but the last token: full blocks, then a tail)
        llm = LLM(model, device="cpu", dtype="float32", max_model_len=64, block_size=16, enable_prefix_caching=asked)
        try:
            first = llm.generate(prompt, params, use_tqdm=False)
            assert first[0].num_cached_tokens == 0 and llm.last_stats["kept_prefill_tokens"] == 0
            again = llm.generate(prompt, params, use_tqdm=False)
            assert (again[0].num_cached_tokens, llm.last_stats["kept_prefill_tokens"]) == (kept, kept), asked
            assert llm.last_stats["prefill_tokens_computed"] == 40 - kept
            assert again[0].outputs[0].token_ids == first[0].outputs[0].token_ids
        finally:
            llm.shutdown()
