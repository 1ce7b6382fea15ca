"""An output's text is the text it adds after the prompt, as vLLM's detokenizer gives it (its stream is primed with
the prompt's last tokens). SentencePiece decoders (Llama 2, Mistral) drop the space that starts a text, so an output
decoded alone lost its first space: "The capital of France is" + "▁of" read "of", where vLLM gives " of"."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchllm.output_processor import CompletionState, _alone_drops_a_leading_space
from batchllm.sampling_params import SamplingParams

CORPUS = ["The capital of France is Paris.", "Hello, my name is Alice and I like cats.",
          "Once upon a time there was a dog.", "naïve café über 日本"] * 20


def llama2_style_tokenizer():
    """A small BPE with byte fallback and Llama 2's decoder ("▁" -> " ", then the first space stripped)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=special))
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer():
    return llama2_style_tokenizer()


def output_text(tokenizer, prompt_ids, output_ids, **params) -> CompletionState:
    state = CompletionState(0, SamplingParams(**params), tokenizer, prompt_ids)
    for token in output_ids:
        if state.append(token, None) is not None:
            break
    return state


def test_the_first_output_token_keeps_its_space_after_the_prompt(tokenizer):
    prompt = tokenizer.encode("The capital of France is")
    output = tokenizer.encode("of Paris.", add_special_tokens=False)  # ▁of ▁Paris .
    assert _alone_drops_a_leading_space(tokenizer), "the decoder strips a text's first space"
    assert tokenizer.decode(output) == "of Paris.", "decoded alone, the space is gone"
    assert output_text(tokenizer, prompt, output).to_output().text == " of Paris."
    assert output_text(tokenizer, None, output).to_output().text == "of Paris.", "without a prompt: as before"
    after_multibyte = tokenizer.encode("naïve café über 日本")  # the prompt ends in byte-fallback pieces
    assert output_text(tokenizer, after_multibyte, output).to_output().text == " of Paris."
    as_array = np.asarray(prompt, dtype=np.int32)  # as `run`, data parallelism and Ray hand prompts over
    assert output_text(tokenizer, as_array, output).to_output().text == " of Paris."
    replacement = tokenizer.encode("The text holds \ufffd is", add_special_tokens=False)  # a literal U+FFFD
    assert output_text(tokenizer, replacement, output).to_output().text == " of Paris.", "still after the prompt"


def test_a_stop_string_that_starts_with_a_space_matches_the_first_token(tokenizer):
    prompt = tokenizer.encode("The capital of France is")
    output = tokenizer.encode("of Paris.", add_special_tokens=False)
    state = output_text(tokenizer, prompt, output, stop=[" Paris"], include_stop_str_in_output=True)
    assert state.stop_text == " of Paris"
    first = output_text(tokenizer, prompt, output, stop=[" of"])
    assert first.stop_text == "" and len(first.token_ids) == 1, "stopped on the first token, its text cut"


def test_byte_level_tokenizers_decode_outputs_alone(default_model_dir):
    """Llama 3 / Qwen / SmolLM2 keep a token's space decoded alone: no priming, no extra decoding."""
    from batchllm.inputs import load_tokenizer

    smol = load_tokenizer(default_model_dir)
    assert not _alone_drops_a_leading_space(smol)
    prompt, output = smol.encode("The capital of France is"), smol.encode(" Paris.", add_special_tokens=False)
    state = output_text(smol, prompt, output)
    assert state.to_output().text == " Paris." and state._primer is None


@pytest.fixture(scope="module")
def llama2_style_model(tokenizer, tmp_path_factory):
    """A tiny random Llama with that tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("llama2-style")
    tokenizer.save_pretrained(out)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


def test_run_answers_read_as_the_prompt_continues(tokenizer, llama2_style_model, tmp_path, capsys):
    """`run` hands the engine int32 arrays: the first cut of this change failed every answer on such a model
    ("the truth value of an array ... is ambiguous")."""
    import json

    from batchllm import cli

    words = [tokenizer.convert_tokens_to_ids(t) for t in ("▁of", "▁Pa", "ris", "▁time", "▁a")]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": "q", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
                               "allowed_token_ids": words}) + "\n")
    code = cli.main(["run", str(src), "-o", str(out), "--model", str(llama2_style_model), "--device", "cpu",
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    prompt = tokenizer.encode("The capital of France is")
    whole = tokenizer.decode(prompt + record["token_ids"], skip_special_tokens=True)
    assert record["text"] == whole[len(tokenizer.decode(prompt, skip_special_tokens=True)):]


def test_an_empty_text_prompt_is_its_bos_where_the_tokenizer_adds_one(tokenizer, llama2_style_model, tmp_path):
    """"" was refused before it was tokenized ("prompt 0 is empty"); vLLM tokenizes it, and refuses only a prompt
    of no tokens: with this tokenizer it is [<s>], and runs, in `LLM.generate` and in both line formats."""
    import json

    from batchllm import LLM, cli

    llm = LLM(str(llama2_style_model), dtype="float32", device="cpu")
    out = llm.generate("", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert out.prompt_token_ids == [tokenizer.bos_token_id] and len(out.outputs[0].token_ids) == 3
    src, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "", "max_tokens": 2}) + "\n" + json.dumps(
        {"custom_id": "b", "url": "/v1/completions", "method": "POST", "body": {"prompt": "", "max_tokens": 2}}) + "\n")
    assert cli.main(["run", str(src), "-o", str(results), "--model", str(llama2_style_model), "--device", "cpu",
                     "--no-progress"]) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r.get("custom_id") or r["id"] for r in records) == ["a", "b"]
    assert not any(r.get("error") for r in records)


def test_llm_answers_read_as_the_prompt_continues(tokenizer, llama2_style_model):
    """Through `LLM.generate` on a model with that tokenizer: the text is what decoding prompt and output
    together adds to the prompt's text, the first space included."""
    from batchllm import LLM

    words = [tokenizer.convert_tokens_to_ids(t) for t in ("▁of", "▁Pa", "ris", "▁time", "▁a")]
    assert tokenizer.unk_token_id not in words
    llm = LLM(str(llama2_style_model), dtype="float32", device="cpu")
    outputs = llm.generate(["The capital of France is", "Once upon a time"],
                           SamplingParams(temperature=0, max_tokens=5, allowed_token_ids=words), use_tqdm=False)
    for out in outputs:
        whole = tokenizer.decode(out.prompt_token_ids + out.outputs[0].token_ids, skip_special_tokens=True)
        prompt_text = tokenizer.decode(out.prompt_token_ids, skip_special_tokens=True)
        assert out.outputs[0].text == whole[len(prompt_text):]
    firsts = [tokenizer.convert_ids_to_tokens(out.outputs[0].token_ids[0]) for out in outputs]
    assert any(piece.startswith("▁") for piece in firsts), "some answer starts with a word (the case fixed)"


@pytest.mark.parametrize("which", ["llama2", "smollm2"])
def test_spaces_between_special_tokens_false_is_taken_and_puts_no_space_between_them(which, tokenizer,
                                                                                      default_model_dir):
    """vLLM's False (lm-evaluation-harness sets it) was refused. Whole-output decoding puts no space between
    consecutive special tokens, which is the text vLLM's False asks for, so both values give it."""
    from batchllm.inputs import load_tokenizer

    tok = tokenizer if which == "llama2" else load_tokenizer(default_model_dir)
    bos, eos = tok.bos_token_id if tok.bos_token_id is not None else 1, tok.eos_token_id
    output = [*tok.encode("of", add_special_tokens=False), bos, eos, bos, *tok.encode("of", add_special_tokens=False)]
    prompt = tok.encode("The capital is")
    texts = {flag: output_text(tok, prompt, output, skip_special_tokens=False, ignore_eos=True,
                               spaces_between_special_tokens=flag).to_output().text for flag in (True, False)}
    specials = tok.convert_ids_to_tokens([bos]) + tok.convert_ids_to_tokens([eos])
    for text in texts.values():  # (either value: whole-output decoding puts none there)
        assert specials[0] + specials[1] + specials[0] in text, "no space between consecutive special tokens"


def byte_pieces_as_text(tokenizer):
    """The tokenizer with its byte-fallback pieces ordinary vocabulary, as Llama 2's are (trained as special tokens
    above, decoding skipped them)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["added_tokens"] = [a for a in data["added_tokens"] if not a["content"].startswith("<0x")]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def test_a_stop_string_past_min_tokens_is_found_when_a_character_is_cut_at_min_tokens(tokenizer):
    """min_tokens ending inside a byte-fallback character counted that character's U+FFFD as text already
    written, so a stop string ending just past it was never found (vLLM holds the partial character back)."""
    tokenizer = byte_pieces_as_text(tokenizer)
    ids = tokenizer.encode("The crab 🦀 is red", add_special_tokens=False)
    first_byte = next(i for i, t in enumerate(tokenizer.convert_ids_to_tokens(ids)) if t.startswith("<0x"))
    state = output_text(tokenizer, None, ids, stop=["🦀"], min_tokens=first_byte + 1)
    assert state.stop_text is not None and state.to_output().text == "The crab "
    assert state.to_output().token_ids == ids[:first_byte + 4], "stopped where the emoji's last byte came"


def test_decoded_tokens_of_byte_pieces_and_word_boundaries_are_vllms(tokenizer):
    """vLLM 0.26 names a byte-fallback piece "" until the piece completing its character, which gets the whole
    character (each was U+FFFD), and puts back the leading space a Metaspace tokenizer's decode drops (" of",
    not "of"); alternatives at a position are read with the same context."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from batchllm.output_processor import _decode_entries
    from batchllm.request_output import Logprob

    tokenizer = byte_pieces_as_text(tokenizer)
    ids = tokenizer.encode("crab 🦀 is", add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[-6:] == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x80>", "▁is"], pieces
    entries = [{t: Logprob(-1.0)} for t in ids]
    entries[-2][ids[0]] = Logprob(-2.0)  # an alternative, at the position completing the emoji
    _decode_entries(entries, tokenizer)
    names = [next(iter(e.values())).decoded_token for e in entries]
    alone = [tokenizer.decode([t]) for t in ids]  # (this decoder drops a text's first space: no Metaspace marker)
    assert names == [*alone[:-5], "", "", "", "🦀", alone[-1]], names
    assert entries[-2][ids[0]].decoded_token == alone[0], "an alternative is read with the same context"

    meta = Tokenizer(models.BPE(unk_token="<unk>"))
    meta.pre_tokenizer = pre_tokenizers.Metaspace()
    meta.decoder = decoders.Metaspace()
    meta.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=meta, unk_token="<unk>")
    words = fast.encode("The capital of France", add_special_tokens=False)
    entries = [{t: Logprob(-1.0)} for t in words]
    _decode_entries(entries, fast)
    assert [next(iter(e.values())).decoded_token for e in entries] == [" The", " capital", " of", " France"]
    from batchllm.output_processor import decoded_token_text

    assert decoded_token_text(fast, fast.convert_tokens_to_ids("▁"), []) == " ", "a lone marker piece is a space"
