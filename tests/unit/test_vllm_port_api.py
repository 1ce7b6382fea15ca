"""What a vLLM 0.26 script ported to `batchllm.LLM` / `EngineArgs` meets: seeds, prompt types, tokenization keywords,
the EngineArgs parser and vLLM's EngineArgs field names."""

import logging

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
