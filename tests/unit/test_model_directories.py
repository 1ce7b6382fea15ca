"""Model directories as users download them (session 33): which weight files load, the context a model's config
gives, and the messages of a directory that lacks something, before a job writes anything."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from batchllm import LLM, SamplingParams, cli
from batchllm.models.spec import ModelLoadError
from tests.helpers import hf_greedy, llama3_rope_divisors, make_tiny_model, tokenizer_files, write_gguf


def _greedy(model_dir, prompts, max_tokens, **llm_kwargs):
    llm = LLM(str(model_dir), device="cpu", dtype="float32", **llm_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    try:
        return [list(o.outputs[0].token_ids)
                for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    finally:
        llm.shutdown()


def test_only_the_files_the_index_names_are_loaded(tmp_path, default_model_dir):
    """Mistral's repositories ship `consolidated.safetensors` (its own names) beside the sharded checkpoint: every
    *.safetensors was read, and the load failed on 'layers.0.attention.wk.weight'."""
    from safetensors.torch import save_file

    model = make_tiny_model("mistral", tmp_path / "m", tokenizer_dir=default_model_dir)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model).save_pretrained(model, max_shard_size="100KB")
    (model / "model.safetensors").unlink()
    assert (model / "model.safetensors.index.json").is_file()
    save_file({"layers.0.attention.wk.weight": torch.zeros(16, 64)}, str(model / "consolidated.safetensors"))
    prompt = [[1, 400, 500, 600, 700]]
    assert _greedy(model, prompt, 6) == hf_greedy(model, prompt, 6, stop_at_eos=False)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[-1]
    (model / missing).unlink()
    with pytest.raises(ModelLoadError, match=f"lacks weight file.*{missing}"):
        LLM(str(model), device="cpu")


def test_a_stored_head_of_a_tied_model_is_skipped_whatever_its_files_order(tmp_path, default_model_dir):
    """tie_word_embeddings with an lm_head.weight stored too: in a later shard it was copied into the tensor the head
    shares with the embedding, changing both; vLLM skips a tied model's stored head."""
    from safetensors.torch import load_file, save_file

    model = make_tiny_model("qwen2", tmp_path / "m", tokenizer_dir=default_model_dir)  # tied
    prompt = [[1, 400, 500, 600, 700]]
    expected = hf_greedy(model, prompt, 6, stop_at_eos=False)
    weights = load_file(model / "model.safetensors")
    assert "lm_head.weight" not in weights
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    head = torch.randn_like(weights["model.embed_tokens.weight"])
    save_file({"lm_head.weight": head}, str(model / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {name: "model-00001-of-00002.safetensors" for name in weights}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert _greedy(model, prompt, 6) == expected


def test_a_tokenizer_shipped_only_as_sentencepiece_loads(tmp_path):
    """A Llama-2-era directory whose only tokenizer is tokenizer.model failed: "tiktoken is required to read a
    tiktoken file" (sentencepiece, which transformers reads it with, was not installed)."""
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(300)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                             model_type="bpe", minloglevel=2)
    model = make_tiny_model("llama", tmp_path / "m")
    shutil.copy(tmp_path / "sp.model", model / "tokenizer.model")
    (model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    llm = LLM(str(model), device="cpu", dtype="float32")
    try:
        out = llm.generate("the quick fox", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                           use_tqdm=False)[0]
        expected = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model")).encode("the quick fox")
        assert out.prompt_token_ids[-len(expected):] == expected and len(out.outputs[0].token_ids) == 3
    finally:
        llm.shutdown()


def test_a_linear_rope_factor_extends_the_context_as_vllm_derives_it(tmp_path, default_model_dir):
    """max_position_embeddings 64 with a linear factor 2 is a 128-token context (vLLM's); it was refused past 64."""
    scaling = {"rope_type": "linear", "factor": 2.0}
    model = make_tiny_model("llama", tmp_path / "m", tokenizer_dir=default_model_dir, max_position_embeddings=64,
                            rope_scaling=scaling)
    assert LLM(str(model), device="cpu").max_model_len == 128
    prompt = [[1] + [(97 * i) % 40000 + 10 for i in range(89)]]  # 90 tokens, past 64
    assert _greedy(model, prompt, 8) == hf_greedy(model, prompt, 8, stop_at_eos=False)
    with pytest.raises(ValueError, match=r"exceeds what the model supports \(128; max_position_embeddings 64 x"):
        LLM(str(model), device="cpu", max_model_len=129)


@pytest.mark.parametrize("scaling, top_level, context", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, {}, 128),
    ({"type": "yarn", "factor": 2.0, "beta_fast": 16, "attention_factor": 0.8}, {}, 128),
    ({"rope_type": "yarn", "factor": None}, {"original_max_position_embeddings": 32}, 64)])
def test_yarn_rope_matches_hf_and_extends_the_context_as_vllm_derives_it(tmp_path, default_model_dir, scaling,
                                                                         top_level, context):
    """Qwen2.5's model cards add a yarn rope_scaling for long contexts; it was refused once the engine was built,
    after `run` had written its output's state file. The original context and a null factor are resolved as
    transformers resolves them (a top-level original_max_position_embeddings first; null: context / original)."""
    model = make_tiny_model("qwen2", tmp_path / "m", tokenizer_dir=default_model_dir, max_position_embeddings=64,
                            rope_scaling=scaling, **top_level)
    assert LLM(str(model), device="cpu").max_model_len == context
    prompt = [[1] + [(97 * i) % 40000 + 10 for i in range(context - 19)]]  # past the original context
    assert _greedy(model, prompt, 8) == hf_greedy(model, prompt, 8, stop_at_eos=False)


def test_a_config_that_cannot_run_is_named_before_anything_is_written(tmp_path, capsys, default_model_dir):
    """A dynamic rope failed at the engine's build (after the output was begun), and heads that do not divide the
    hidden size failed as "cannot load a tokenizer"."""
    from batchllm.models.spec import read_model_spec

    dynamic = make_tiny_model("llama", tmp_path / "dyn", tokenizer_dir=default_model_dir,
                              rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ModelLoadError, match="rope_scaling type 'dynamic' is not supported"):
        read_model_spec(dynamic)
    odd = tmp_path / "odd"
    shutil.copytree(dynamic, odd)
    config = json.loads((odd / "config.json").read_text())
    config.update(num_attention_heads=3, num_key_value_heads=1, rope_scaling=None)
    for key in ("head_dim", "rope_parameters"):
        config.pop(key, None)
    (odd / "config.json").write_text(json.dumps(config))
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    for model, message in ((dynamic, "rope_scaling type 'dynamic'"),
                           (odd, "hidden_size 64 is not a multiple of num_attention_heads 3")):
        code = cli.main(["run", str(src), "-o", str(tmp_path / "out.jsonl"), "--model", str(model), "--no-progress"])
        assert code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "out.jsonl").exists()


def _edit_config(model_dir, edit):
    """model_dir after `edit(config)` changed its config.json (as saved, transformers has completed its rope)."""
    config = json.loads((model_dir / "config.json").read_text())
    edit(config)
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def _no_original_context(config):
    config["rope_parameters"].pop("original_max_position_embeddings")


def _transformers_4_keys_no_original_context(config):
    scaling = config.pop("rope_parameters")
    config.update(rope_theta=scaling.pop("rope_theta"), rope_scaling=scaling)
    scaling.pop("original_max_position_embeddings")


def _a_top_level_theta_too(config):
    config["rope_theta"] = 10000.0  # rope_parameters': 500000


@pytest.mark.parametrize("edit", [_no_original_context, _transformers_4_keys_no_original_context,
                                  _a_top_level_theta_too])
def test_a_llama3_rope_as_transformers_completes_it_matches_hf(tmp_path, default_model_dir, edit):
    """A llama3 rope without original_max_position_embeddings (transformers 5 takes max_position_embeddings) failed
    with a KeyError once the engine was built, after `run` had begun its output; a top-level rope_theta beside
    rope_parameters' was read over it (transformers reads rope_parameters')."""
    model = _edit_config(make_tiny_model("llama", tmp_path / "m", tokenizer_dir=default_model_dir), edit)
    prompt = [[1] + [(97 * i) % 40000 + 10 for i in range(59)]]
    assert _greedy(model, prompt, 8) == hf_greedy(model, prompt, 8, stop_at_eos=False)


def test_a_rope_lacking_a_key_transformers_requires_is_named_before_anything_is_written(tmp_path, capsys,
                                                                                        default_model_dir):
    """It failed as "cannot load a tokenizer" (transformers' KeyError when the tokenizer read the config), and with
    --tokenizer as an "unexpected failure" (exit 3, KeyError) once the engine was built, after the output was
    begun."""
    model = _edit_config(make_tiny_model("llama", tmp_path / "m"), lambda c: c["rope_parameters"].pop("factor"))
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "hi"}\n')
    for tokenizer in ([], ["--tokenizer", str(default_model_dir)]):
        code = cli.main(["run", str(src), "-o", str(tmp_path / "out.jsonl"), "--model", str(model), "--no-progress",
                         *tokenizer])
        assert code == 2 and "the llama3 rope in rope_parameters lacks factor" in capsys.readouterr().err
        assert not (tmp_path / "out.jsonl").exists()


def test_a_sliding_window_caps_the_context_and_says_why(tmp_path, default_model_dir):
    """vLLM's disable_sliding_window=True asks for what runs here (it was refused as "not supported")."""
    model = make_tiny_model("mistral", tmp_path / "m", tokenizer_dir=default_model_dir, sliding_window=32,
                            max_position_embeddings=256)
    assert LLM(str(model), device="cpu", disable_sliding_window=True).max_model_len == 32
    with pytest.raises(ValueError, match=r"supports \(32; its sliding window: attention here has no window"):
        LLM(str(model), device="cpu", max_model_len=64)


def test_a_window_no_layer_uses_does_not_cap_the_context(tmp_path, default_model_dir):
    """A Qwen2 config with use_sliding_window but max_window_layers at its layer count (transformers: every layer
    full attention) capped the context at the window and refused a prompt longer than it, which transformers runs.
    Now it runs, token for token as transformers does past the window."""
    qwen = make_tiny_model("qwen2", tmp_path / "q", tokenizer_dir=default_model_dir, use_sliding_window=True,
                           sliding_window=16, max_window_layers=2)
    prompt = list(range(5, 45))  # (40 tokens: past the window)
    llm = LLM(str(qwen), device="cpu", max_model_len=128)
    got = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    assert list(got[0].outputs[0].token_ids) == hf_greedy(qwen, [prompt], 6, stop_at_eos=False)[0]
    sliding = make_tiny_model("qwen2", tmp_path / "s", tokenizer_dir=default_model_dir, use_sliding_window=True,
                              sliding_window=16, max_window_layers=1)
    assert LLM(str(sliding), device="cpu", disable_sliding_window=True).max_model_len == 16, "layer 1 slides"


def test_cached_rotary_tables_are_skipped_and_an_untied_stored_head_is_named(tmp_path, default_model_dir, caplog):
    """A checkpoint with ColossalAI's rotary_emb.cos_cached / sin_cached was refused as "unexpected weight" (vLLM
    skips them). A tied model whose checkpoint also stores another lm_head.weight runs on the embedding, as in
    vLLM, and says so (transformers would use the stored head)."""
    from safetensors.torch import load_file, save_file

    model = make_tiny_model("qwen2", tmp_path / "m", tokenizer_dir=default_model_dir)
    weights = load_file(str(model / "model.safetensors"))
    plain = LLM(str(model), device="cpu").generate({"prompt_token_ids": [5, 6, 7]},
                                                   SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    extra = {"model.layers.0.self_attn.rotary_emb.cos_cached": torch.ones(8, 4),
             "model.layers.0.self_attn.rotary_emb.sin_cached": torch.zeros(8, 4),
             "lm_head.weight": weights["model.embed_tokens.weight"] * 2}
    save_file({**weights, **extra}, str(model / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="batchllm.models.loader"):
        got = LLM(str(model), device="cpu").generate({"prompt_token_ids": [5, 6, 7]},
                                                     SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert got[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert "stores an lm_head.weight that differs from the embedding" in caplog.text


@pytest.mark.parametrize("damage, message", [
    ("no weights", "holds no \\*.safetensors weights"),
    ("bin weights", r"holds PyTorch weights \(pytorch_model.bin\), not \*.safetensors"),
    ("no tokenizer", "holds none of tokenizer.json, tokenizer.model"),
    ("tokenizer path", "cannot load a tokenizer from '/no/such/tokenizer': no such directory"),
    ("tokenizer id", "tokenizer 'no-org/no-tokenizer' is neither a local directory nor in the Hugging Face cache"),
])
def test_a_directory_that_lacks_something_fails_before_the_job_writes(tmp_path, capsys, default_model_dir,
                                                                      damage, message):
    """These failed after the output and its state file were written (docs/architecture.md says the model directory
    is checked before), some with transformers' words: a bad repo id for a missing directory, a missing sentencepiece
    for no tokenizer file."""
    model = make_tiny_model("llama", tmp_path / "m", tokenizer_dir=default_model_dir)
    extra = []
    if damage in ("no weights", "bin weights"):
        (model / "model.safetensors").unlink()
    if damage == "bin weights":
        (model / "pytorch_model.bin").write_bytes(b"not read")
    if damage == "no tokenizer":
        for f in tokenizer_files(model):
            f.unlink()
    if damage == "tokenizer path":
        extra = ["--tokenizer", "/no/such/tokenizer"]
    if damage == "tokenizer id":
        extra = ["--tokenizer", "no-org/no-tokenizer"]
    (src := tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "Hi"}\n')
    code = cli.main(["run", str(src), "-o", str(tmp_path / "out" / "o.jsonl"), "--model", str(model),
                     "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(re.findall(message, err)) == 1, err
    assert not list((tmp_path / "out").glob("*")), "nothing is written for a model that cannot load"


def test_chat_without_a_template_says_how_to_give_one(tmp_path, default_model_dir):
    model = make_tiny_model("llama", tmp_path / "m", tokenizer_dir=default_model_dir)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    for f in model.glob("chat_template*"):
        f.unlink()
    shutil.rmtree(model / "additional_chat_templates", ignore_errors=True)
    llm = LLM(str(model), device="cpu")
    with pytest.raises(ValueError, match="has no chat template: give one with --chat-template"):
        llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=2))


def test_a_rendered_chat_gets_no_bos_its_template_did_not_place(tmp_path, default_model_dir):
    """A tokenizer that adds a BOS, a template that writes none (a base model given --chat-template): the rendered
    chat was tokenized with the BOS added, one token more than vLLM's chat and transformers' apply_chat_template;
    in `LLM.chat` and in `run`'s chat lines alike. A plain prompt still gets it."""
    from transformers import AutoTokenizer

    from batchllm.inputs import prompt_processor_for
    from batchllm.io.ingest import prepare_lines
    from batchllm.io.job import ResumeState

    model = make_tiny_model("llama", tmp_path / "m", tokenizer_dir=default_model_dir)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|endoftext|>",
                              "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}], "pair": [{"Sequence": {
                              "id": "A", "type_id": 0}}], "special_tokens": {"<|endoftext|>": {
                              "id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<|endoftext|>"}))
    hf = AutoTokenizer.from_pretrained(model)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert expected[0] != 0 and hf("Hi")["input_ids"][0] == 0, "the tokenizer adds a BOS the template does not"
    llm = LLM(str(model), device="cpu")
    chat = llm.chat(messages, SamplingParams(max_tokens=1))[0]
    assert chat.prompt_token_ids == expected
    assert llm.generate("Hi", SamplingParams(max_tokens=1))[0].prompt_token_ids == hf("Hi")["input_ids"]
    (src := tmp_path / "in.jsonl").write_text(json.dumps({"id": "c", "messages": messages}) + "\n"
                                              + json.dumps({"id": "p", "prompt": "Hi"}) + "\n")
    lines = prepare_lines(src, prompt_processor_for(str(model)), {"max_tokens": 1}, None, ResumeState()).valid
    assert [list(v.prompt.array) for v in lines] == [expected, hf("Hi")["input_ids"]]


def test_skip_tokenizer_init_needs_no_tokenizer_files(tmp_path, capsys):
    """The check of a model's files before `run` writes asked for tokenizer files that --skip-tokenizer-init never
    reads (a review caught it failing such a job)."""
    model = make_tiny_model("llama", tmp_path / "m")  # config.json and weights only
    (src := tmp_path / "in.jsonl").write_text('{"id": "a", "prompt_token_ids": [5, 6, 7], "max_tokens": 2}\n')
    code = cli.main(["run", str(src), "-o", str(tmp_path / "o.jsonl"), "--model", str(model), "--no-progress",
                     "--skip-tokenizer-init"])
    assert code == 0, capsys.readouterr().err
    assert len(json.loads((tmp_path / "o.jsonl").read_text())["token_ids"]) == 2


def test_tokens_named_by_id_need_no_tokenizer(tmp_path, capsys):
    """run-batch's --return-tokens-as-token-ids was refused; under --skip-tokenizer-init an OpenAI line asking
    logprobs failed for want of token names. With the flag it runs, every token named "token_id:N", as vLLM's."""
    model = make_tiny_model("llama", tmp_path / "m")
    body = {"prompt": [5, 6, 7], "max_tokens": 2, "logprobs": 1}
    (src := tmp_path / "in.jsonl").write_text(json.dumps({"custom_id": "a", "url": "/v1/completions", "body": body})
                                              + "\n")
    code = cli.main(["run", str(src), "-o", str(tmp_path / "o.jsonl"), "--model", str(model), "--no-progress",
                     "--skip-tokenizer-init", "--return-tokens-as-token-ids"])
    assert code == 0, capsys.readouterr().err
    choice = json.loads((tmp_path / "o.jsonl").read_text())["response"]["body"]["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == 2
    assert all(re.fullmatch(r"token_id:\d+", t) for t in choice["logprobs"]["tokens"])


def test_a_gguf_file_is_converted_once_and_runs_as_its_model(tmp_path, monkeypatch, capsys, default_llm):
    """A GGUF file as the model (BatchLLM's own: vLLM 0.26 has no GGUF loader) was "not a directory". It is
    converted once into the cache, as the embedded default model (itself a GGUF file) is, and answers as that model
    does."""
    from batchllm.models.default_model import find_gguf

    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "Mine.Q4_1.gguf"
    shutil.copy(find_gguf(), gguf)
    prompts, params = ["The capital of France is", "1, 2, 3,"], SamplingParams(temperature=0, max_tokens=8)
    expected = [o.outputs[0].token_ids for o in default_llm.generate(prompts, params, use_tqdm=False)]
    for _ in range(2):  # the second build finds the converted directory
        llm = LLM(str(gguf), device="cpu", dtype="float32", max_model_len=256)
        try:
            assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
            assert llm.model_config.model == str(gguf)
        finally:
            llm.shutdown()
    def conversions():  # (beside each, its lock file: `.<name>.lock`)
        return [p for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.startswith(".")]

    [converted] = conversions()
    assert json.loads((converted / "config.json").read_text())["_name_or_path"] == "Mine.Q4_1"
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed: converted again, and the
    LLM(str(gguf), device="cpu", dtype="float32", max_model_len=256).shutdown()  # older copy removed
    assert [p.name for p in conversions()] != [converted.name]
    assert len(conversions()) == 1 and len(list((tmp_path / "cache" / "gguf").iterdir())) == 2, "one lock file left"
    with pytest.raises(ModelLoadError, match="'nope.gguf' names a GGUF file, and there is no such file"):
        LLM("nope.gguf", device="cpu")
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ModelLoadError, match="cannot convert the GGUF model .*damaged.gguf"):
        LLM(str(damaged), device="cpu")
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    assert cli.main(["plan", "--model", str(damaged), str(tmp_path / "in.jsonl")]) == 2
    assert "cannot convert the GGUF model" in capsys.readouterr().err


def _gguf_greedy(gguf, prompts, max_tokens=8):
    llm = LLM(str(gguf), device="cpu", dtype="float32")
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                             use_tqdm=False)]
    finally:
        llm.shutdown()


GGUF_PROMPTS = [list(range(5, 25)), [100, 2000, 30000, 45000, 7, 7, 7]]


def test_a_gguf_files_end_of_turn_token_ends_generation(tmp_path, monkeypatch, tiny_model_factory):
    """transformers' GGUF reader keeps only tokenizer.ggml.eos_token_id: a file naming an end-of-turn token (Llama
    3.1's <|eot_id|> and <|eom_id|>, where llama.cpp stops) generated past it. The converted generation_config.json
    lists it after the EOS, and generation ends on it, as on a secondary EOS (its id the stop_reason)."""
    from gguf import GGUFValueType

    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path / "cache"))
    llama = Path(tiny_model_factory("llama"))
    plain = write_gguf(llama, tmp_path / "plain.gguf", "llama", rope_freqs=llama3_rope_divisors(llama))
    tokens = _gguf_greedy(plain, GGUF_PROMPTS[:1], 6)[0]
    end = tokens[3]
    assert end not in tokens[:3] and end != 2, tokens  # (the tiny model's greedy tokens: a later one is the end)
    metadata = {"tokenizer.ggml.eot_token_id": (end, GGUFValueType.UINT32),
                "tokenizer.ggml.eom_token_id": (end, GGUFValueType.UINT32)}
    gguf = write_gguf(llama, tmp_path / "eot.gguf", "llama", rope_freqs=llama3_rope_divisors(llama),
                      metadata=metadata)
    llm = LLM(str(gguf), device="cpu", dtype="float32")
    try:
        [output] = llm.generate([{"prompt_token_ids": GGUF_PROMPTS[0]}], SamplingParams(temperature=0, max_tokens=6),
                                use_tqdm=False)
        converted = llm.model_dir
    finally:
        llm.shutdown()
    completion = output.outputs[0]
    assert (completion.token_ids, completion.finish_reason, completion.stop_reason) == (tokens[:4], "stop", end)
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == [2, end]


def test_a_gguf_files_rope_scaling_is_kept(tmp_path, monkeypatch, tiny_model_factory):
    """transformers' GGUF reader drops rope scaling: a Llama 3.1-style file (llama.cpp writes its llama3 scaling as
    a rope_freqs.weight tensor) or one with yarn keys ran with plain rope, different tokens from its model with no
    word said. The scaling is now carried into the converted config.json, and both answer as their models do."""
    from gguf import GGUFValueType

    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path / "cache"))
    llama = tiny_model_factory("llama")  # (TINY_CONFIGS: llama3 scaling, original context 256)
    gguf = write_gguf(Path(llama), tmp_path / "llama3.gguf", "llama", rope_freqs=llama3_rope_divisors(Path(llama)))
    assert _gguf_greedy(gguf, GGUF_PROMPTS) == hf_greedy(llama, GGUF_PROMPTS, 8, stop_at_eos=False)
    def conversions():  # (beside each, its lock file: `.<name>.lock`)
        return [p for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.startswith(".")]

    [converted] = conversions()
    rope = json.loads((converted / "config.json").read_text())["rope_parameters"]
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("llama3", 8.0, 256)

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0}
    qwen = make_tiny_model("qwen2", tmp_path / "qwen2-yarn", tokenizer_dir=Path(llama), rope_parameters=yarn)
    keys = {"qwen2.rope.scaling.type": ("yarn", GGUFValueType.STRING),
            "qwen2.rope.scaling.factor": (4.0, GGUFValueType.FLOAT32),
            "qwen2.rope.scaling.original_context_length": (256, GGUFValueType.UINT32)}
    gguf = write_gguf(qwen, tmp_path / "qwen2-yarn.gguf", "qwen2", metadata=keys)
    assert _gguf_greedy(gguf, GGUF_PROMPTS) == hf_greedy(qwen, GGUF_PROMPTS, 8, stop_at_eos=False)


def test_a_gguf_file_that_does_not_convert_whole_is_refused_by_name(tmp_path, monkeypatch, tiny_model_factory):
    """A mixture-of-experts GGUF file (ffn_*_exps tensors: how llama.cpp writes Mixtral) passed the header check,
    and transformers left its MLP weights randomly initialised: it ran, and answered nonsense, from then on out of
    the cache. Rope divisors that no llama3 scaling computes, and a rope scaling type not run here, were dropped.
    Each is now refused, naming the file and what it holds, and nothing is cached."""
    from gguf import GGUFValueType

    from batchllm.models.default_model import gguf_rope_scaling

    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path / "cache"))
    llama = Path(tiny_model_factory("llama"))
    gguf = write_gguf(llama, tmp_path / "moe.gguf", "llama", experts=2, rope_freqs=llama3_rope_divisors(llama))
    with pytest.raises(ModelLoadError, match=r"cannot convert the GGUF model '.*moe.gguf': 6 weights of its "
                                             r"LlamaForCausalLM are not in the file .*model.layers.0.mlp.down_proj"
                                             r".*a mixture-of-experts GGUF file is not run"):
        LLM(str(gguf), device="cpu", dtype="float32")
    import gguf as gguf_package  # the conversion's one reader per file (`_gguf_read_once`) ends with it, failed too
    assert gguf_package.GGUFReader is gguf_package.gguf_reader.GGUFReader
    config = json.loads((llama / "config.json").read_text())
    cases = [(dict(rope_freqs=[1.0, 2.0, 1.0, 3.0, 1.0, 2.0, 1.0, 5.0]),
              r"its rope_freqs.weight divisors are not a llama3 rope scaling"),
             (dict(metadata={"llama.rope.scaling.type": ("longrope", GGUFValueType.STRING),
                             "llama.rope.scaling.factor": (4.0, GGUFValueType.FLOAT32)}),
              r"its rope scaling type 'longrope' is not run here \(linear and yarn are"),
             (dict(metadata={"llama.rope.scaling.type": ("yarn", GGUFValueType.STRING),
                             "llama.rope.scaling.factor": (4.0, GGUFValueType.FLOAT32),
                             "llama.rope.scaling.attn_factor": (0.5, GGUFValueType.FLOAT32)}),
              r"its yarn rope scaling's llama.rope.scaling.attn_factor is not run here"),
             (dict(metadata={"llama.rope.scaling.type": ("linear", GGUFValueType.STRING)}),
              r"its linear rope scaling has no llama.rope.scaling.factor")]
    for index, (how, message) in enumerate(cases):
        gguf = write_gguf(llama, tmp_path / f"rope{index}.gguf", "llama", tokenizer=False, **how)
        with pytest.raises(ModelLoadError, match=f"cannot convert the GGUF model '.*rope{index}.gguf': {message}"):
            gguf_rope_scaling(gguf, config)
    assert not any((tmp_path / "cache" / "gguf").glob("*/.batchllm-converted"))


def test_truncation_keeps_the_bos_and_minus_one_leaves_room_for_max_tokens(tmp_path, tiny_model_factory):
    """vLLM truncates a text prompt in the tokenizer, which keeps the BOS it adds (the prompt lost it here: Llama's
    answers degrade without it), and -1 keeps what the context holds beside the request's max_tokens (it kept the
    context less one: OpenAI lines asking for more failed, others got one token)."""
    from transformers import AutoTokenizer

    model = tmp_path / "m"
    shutil.copytree(tiny_model_factory("llama"), model)
    tokenizer_json = json.loads((model / "tokenizer.json").read_text())
    tokenizer_json["post_processor"] = {  # a BOS (id 1) before every text, as Llama's tokenizers add one
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                                 {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    text = "one two three four five six seven eight nine ten " * 10
    hf = AutoTokenizer.from_pretrained(model)
    hf.truncation_side = "left"
    llm = LLM(str(model), device="cpu", dtype="float32", max_model_len=64)
    try:
        params = SamplingParams(max_tokens=2, truncate_prompt_tokens=4, temperature=0)
        out = llm.generate(text, params, use_tqdm=False)[0]
        assert out.prompt_token_ids == hf(text, truncation=True, max_length=4)["input_ids"]
        assert out.prompt_token_ids[0] == 1 and len(out.prompt_token_ids) == 4
        whole = SamplingParams(max_tokens=5, truncate_prompt_tokens=-1, ignore_eos=True)
        out = llm.generate(text, whole, use_tqdm=False)[0]
        assert (len(out.prompt_token_ids), len(out.outputs[0].token_ids)) == (59, 5)
        assert out.prompt_token_ids[0] == 1
    finally:
        llm.shutdown()


def test_truncation_keeps_every_special_token_the_tokenizer_adds(tmp_path, tiny_model_factory):
    """A tokenizer adding two tokens before a text and one after (GLM's [gMASK]<sop>, an appended EOS) lost the
    second one (only a first token equal to the BOS was kept); vLLM's truncation, in the tokenizer, keeps them all."""
    from transformers import AutoTokenizer

    model = tmp_path / "m"
    shutil.copytree(tiny_model_factory("llama"), model)
    tokenizer_json = json.loads((model / "tokenizer.json").read_text())
    added = {name: {"id": name, "ids": [i], "tokens": [name]} for i, name in
             ((0, "<|endoftext|>"), (1, "<|im_start|>"), (2, "<|im_end|>"))}
    tokenizer_json["post_processor"] = {"type": "TemplateProcessing", "special_tokens": added, "single": [
        {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    text = "one two three four five six seven eight nine ten"
    hf = AutoTokenizer.from_pretrained(model)
    hf.truncation_side = "left"
    llm = LLM(str(model), device="cpu", dtype="float32", max_model_len=64)
    try:
        for keep in (4, 6):
            out = llm.generate(text, SamplingParams(max_tokens=1, truncate_prompt_tokens=keep), use_tqdm=False)[0]
            expected = hf(text, truncation=True, max_length=keep)["input_ids"]
            assert out.prompt_token_ids == expected and expected[:2] == [0, 1] and expected[-1] == 2, keep
    finally:
        llm.shutdown()


def test_a_conversion_parses_each_gguf_file_once(tmp_path):
    """transformers' config, weights and tokenizer loads and `gguf_rope_scaling` each parsed the whole file's
    metadata (5.8 s a time for SmolLM2's vocabulary); within `_gguf_read_once` a path is parsed once."""
    import gguf as gguf_package

    from batchllm.models.default_model import _gguf_read_once, find_gguf

    with _gguf_read_once():
        first = gguf_package.GGUFReader(find_gguf())
        assert gguf_package.GGUFReader(str(find_gguf())) is first
    assert gguf_package.GGUFReader is gguf_package.gguf_reader.GGUFReader


def _with_nonzero_biases(name: str, directory: Path, keys: dict) -> int:
    """A tiny `name` model with config `keys`, its biases (those transformers made) nonzero, saved in `directory`;
    returns how many bias tensors it has."""
    from transformers import AutoModelForCausalLM

    make_tiny_model(name, directory.with_name(directory.name + "-made"), **keys)
    model = AutoModelForCausalLM.from_pretrained(directory.with_name(directory.name + "-made"), dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        biases = [p.normal_(0.0, 0.5) for n, p in model.named_parameters() if n.endswith(".bias")]
    model.save_pretrained(directory)
    return len(biases)


@pytest.mark.parametrize("name, biases", [("llama", 2 * 7), ("qwen3", 2 * 4), ("qwen2", 2 * 3)])
def test_bias_keys_mean_what_the_architecture_reads_them_as(tmp_path, name, biases):
    """Llama reads attention_bias and mlp_bias, Qwen3 attention_bias only (o_proj's too), Qwen2 neither (q, k and v
    always have one), as transformers and vLLM do: a Qwen config that sets mlp_bias loads without those biases (it
    was refused: "lacks weights ... bias"). Checked on the greedy tokens of transformers' model, its biases made
    nonzero."""
    assert _with_nonzero_biases(name, tmp_path / "m", dict(attention_bias=True, mlp_bias=True)) == biases  # (x layers)
    prompts = [[5, 6, 7, 8, 9], [100, 3, 44]]
    assert _greedy(tmp_path / "m", prompts, 8, skip_tokenizer_init=True, num_kv_blocks=16) == hf_greedy(
        tmp_path / "m", prompts, 8, stop_at_eos=False)


def test_mistral_reads_its_bias_keys_as_vllms_does(tmp_path):
    """vLLM's Mistral is its Llama: a config asking for biases needs them (transformers' Mistral has none and would
    ignore the keys), and a checkpoint with them runs them, as a Llama of the same weights does."""
    _with_nonzero_biases("mistral", tmp_path / "none", dict(attention_bias=True))
    with pytest.raises(ModelLoadError, match=r"lacks weights: .*self_attn\.\w_proj\.bias"):
        LLM(str(tmp_path / "none"), device="cpu", dtype="float32", skip_tokenizer_init=True, num_kv_blocks=16)
    _with_nonzero_biases("llama", tmp_path / "m", dict(attention_bias=True, mlp_bias=True))
    prompts = [[5, 6, 7, 8, 9], [100, 3, 44]]
    expected = hf_greedy(tmp_path / "m", prompts, 8, stop_at_eos=False)  # (transformers' Llama of those weights)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"],
                                                            "model_type": "mistral"}))
    assert _greedy(tmp_path / "m", prompts, 8, skip_tokenizer_init=True, num_kv_blocks=16) == expected
