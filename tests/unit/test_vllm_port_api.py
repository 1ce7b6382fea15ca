"""What a vLLM 0.26 script ported to `batchllm.LLM` / `EngineArgs` meets: seeds, prompt types, tokenization keywords,
the EngineArgs parser and vLLM's EngineArgs field names."""

import json
import logging
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
