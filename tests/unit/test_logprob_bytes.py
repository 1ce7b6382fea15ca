"""OpenAI logprobs of tokens that hold part of a character (issue found in review, session 26).

Byte-level BPE (SmolLM2, Llama 3, Qwen) splits an emoji or a CJK character over several tokens, and
each such token decodes alone to U+FFFD. Those tokens were all written as "\ufffd" with the bytes of
U+FFFD, so `bytes` lost the token's real bytes, completions' `top_logprobs` (keyed by name) let a
lower-ranked "\ufffd" overwrite the top one, and `text_offset` counted three characters for one emoji."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from batchllm.io.openai_batch import CHAT_URL, success_record
from batchllm.output_processor import _decode_entries, token_bytes
from batchllm.request_output import CompletionOutput, Logprob, RequestOutput

TEXT = "pizza 🍕 é 中"


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def entries_for(tokenizer, top: int) -> tuple[list[int], list[dict]]:
    """TEXT's tokens, and at each position the token (rank 1) and the two tokens before and after it in the output
    as lower-ranked alternatives (at most `top`)."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    entries = []
    for i, tid in enumerate(ids):
        others = [t for t in dict.fromkeys(ids[max(0, i - 2):i + 3]) if t != tid][:top]
        entry = {tid: Logprob(-0.1, 1)}
        entry.update({t: Logprob(-1.0 - r, r + 2) for r, t in enumerate(others)})
        entries.append(entry)
    _decode_entries(entries, tokenizer)
    return ids, entries


def record_for(tokenizer, url: str, top: int, tokens_as_ids: bool = False):
    """A finished request whose output is TEXT, its logprobs `entries_for`'s."""
    ids, entries = entries_for(tokenizer, top)
    choice = CompletionOutput(0, tokenizer.decode(ids), ids, -0.1 * len(ids), entries, finish_reason="length")
    output = RequestOutput("r", None, [1, 2, 3], None, [choice])
    record = json.loads(json.dumps(success_record("c", url, "m", output, 3, top, tokens_as_ids=tokens_as_ids)))
    return ids, record["response"]["body"]["choices"][0]["logprobs"]


def test_chat_logprobs_carry_each_tokens_own_bytes(tokenizer):
    ids, logprobs = record_for(tokenizer, CHAT_URL, 2)
    content = logprobs["content"]
    assert any(tokenizer.decode([t]).endswith("\ufffd") for t in ids), "the text must split a character"
    assert b"".join(bytes(c["bytes"]) for c in content) == TEXT.encode(), "the bytes add up to the text"
    for c in content:
        raw = bytes(c["bytes"])
        try:
            assert c["token"] == raw.decode("utf-8")
        except UnicodeDecodeError:
            assert c["token"] == "bytes:" + raw.decode("utf-8", "backslashreplace") and "\ufffd" not in c["token"]
        assert all(t["token"] != "\ufffd" for t in c["top_logprobs"])


def test_completion_logprobs_keep_distinct_alternatives_and_true_offsets(tokenizer):
    ids, logprobs = record_for(tokenizer, "/v1/completions", 2)
    partial = [i for i, t in enumerate(logprobs["tokens"]) if t.startswith("bytes:")]
    assert len(partial) >= 2
    for position in partial:
        top = logprobs["top_logprobs"][position]
        assert len(top) == 2 and top[logprobs["tokens"][position]] == logprobs["token_logprobs"][position] == -0.1
    text = tokenizer.decode(ids)
    for token, offset in zip(logprobs["tokens"], logprobs["text_offset"]):
        if not token.startswith("bytes:"):
            assert text[offset:].startswith(token), (token, offset)
    emoji = TEXT.index("🍕")
    assert [o for t, o in zip(logprobs["tokens"], logprobs["text_offset"]) if t.startswith("bytes:")] == [
        emoji - 1, emoji, emoji][:len(partial)], "the emoji's pieces start at its space, then at the emoji"


class SentencePieceLike:
    """Llama 2 / Mistral: "▁" marks a word's start, a character outside the vocabulary comes as
    <0xNN> pieces, and decoding drops the text's leading space."""
    pieces = {1: "<0xF0>", 2: "▁the", 3: "▁cat", 4: "<s>", 5: "café"}
    added_tokens_decoder = {4: SimpleNamespace(content="<s>"), 5: SimpleNamespace(content="café")}

    def convert_ids_to_tokens(self, token_id):
        return self.pieces[token_id]

    def decode(self, ids, **kwargs):
        raw = b"".join(bytes([0xF0]) if t == 1 else self.pieces[t].replace("▁", " ").encode() for t in ids)
        return raw.decode("utf-8", "replace").lstrip(" ")


def test_sentencepiece_pieces_and_added_tokens_are_their_bytes():
    tokenizer = SentencePieceLike()
    assert token_bytes(tokenizer, 1) == b"\xf0"
    assert token_bytes(tokenizer, 2) == b" the", "the word boundary is a space, though decoding alone drops it"
    assert token_bytes(tokenizer, 4) == b"<s>" and token_bytes(tokenizer, 5) == "café".encode()


def test_completion_offsets_follow_the_text_a_decoder_strips():
    tokenizer = SentencePieceLike()
    entries = [{2: Logprob(-0.1, 1)}, {3: Logprob(-0.2, 1)}]
    _decode_entries(entries, tokenizer)
    choice = CompletionOutput(0, tokenizer.decode([2, 3]), [2, 3], -0.3, entries, finish_reason="length")
    output = RequestOutput("r", None, [1, 2, 3], None, [choice])
    logprobs = success_record("c", "/v1/completions", "m", output, 3, 1)["response"]["body"]["choices"][0]["logprobs"]
    assert choice.text == "the cat" and logprobs["text_offset"] == [0, 3]
    assert logprobs["tokens"] == [" the", " cat"], "a token's name is its bytes' text, as OpenAI's"


def test_completion_top_logprobs_always_hold_the_sampled_token(tokenizer):
    """OpenAI's legacy completions "always return the logprob of the sampled token, so there may be up to
    logprobs+1 elements"; with logprobs 0 every dict was empty."""
    _, logprobs = record_for(tokenizer, "/v1/completions", 0)
    assert [list(top.items()) for top in logprobs["top_logprobs"]] == [
        [(token, lp)] for token, lp in zip(logprobs["tokens"], logprobs["token_logprobs"])]


def test_logprob_has_vllms_fields_and_dumps_as_json(tokenizer):
    """`token_bytes` was a dataclass field: `json.dumps(dataclasses.asdict(lp))` failed on the bytes of every
    decoded Logprob, and the fields differed from vLLM's Logprob(logprob, rank, decoded_token)."""
    import dataclasses

    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    entries = [{tid: Logprob(-0.1, 1)} for tid in ids]
    _decode_entries(entries, tokenizer)
    lp = entries[0][ids[0]]
    assert [f.name for f in dataclasses.fields(Logprob)] == ["logprob", "rank", "decoded_token"]
    assert json.loads(json.dumps(dataclasses.asdict(lp))) == {"logprob": -0.1, "rank": 1,
                                                              "decoded_token": lp.decoded_token}
    assert lp.token_bytes == token_bytes(tokenizer, ids[0]) and Logprob(-1.0).token_bytes is None
    assert b"".join(e[t].token_bytes for e, t in zip(entries, ids)) == TEXT.encode(), "the users still read them"
    assert lp == Logprob(-0.1, 1, lp.decoded_token) and "token_bytes" not in repr(lp)


def test_an_echoed_prompt_opening_inside_a_character_keeps_true_offsets(tokenizer):
    """An echoed prompt's first token has no logprobs; it was named by decoding it alone ("\ufffd" for the first
    bytes of an emoji) and its offset counted from that name's bytes, so every later `text_offset` was one or two
    characters to the right (the last ones past the text's end). It is now named and counted by its own bytes."""
    from batchllm.io.openai_batch import _completion_logprobs

    text = "🐱 is a cat"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids[:1]).endswith("\ufffd"), "the first token must hold part of the emoji"
    entries = [{tid: Logprob(-0.1, 1)} for tid in ids[1:]]
    _decode_entries(entries, tokenizer)
    logprobs = _completion_logprobs(ids, [None, *entries], text, 0, tokenizer)
    assert logprobs["tokens"][0] == "bytes:" + token_bytes(tokenizer, ids[0]).decode("utf-8", "backslashreplace")
    for token, offset in zip(logprobs["tokens"], logprobs["text_offset"]):
        assert offset <= len(text)
        if not token.startswith("bytes:"):
            assert text[offset:].startswith(token), (token, offset)
    assert logprobs["text_offset"][logprobs["tokens"].index(" is")] == 1



@pytest.mark.parametrize("url", [CHAT_URL, "/v1/completions"])
def test_tokens_as_ids_name_every_token_by_its_id(tokenizer, url):
    """vLLM's return_tokens_as_token_ids (a body's, or run-batch's --return-tokens-as-token-ids) was refused. Under
    it each token and alternative is named "token_id:N", with the logprobs as named by text; a chat's sampled token
    keeps its own bytes and an alternative has its name's (vLLM's); completions' offsets still count the text's
    characters."""
    ids, by_text = record_for(tokenizer, url, 2)
    _, by_id = record_for(tokenizer, url, 2, tokens_as_ids=True)
    _, entries = entries_for(tokenizer, 2)
    if url == CHAT_URL:
        for c, named, tid, entry in zip(by_id["content"], by_text["content"], ids, entries, strict=True):
            assert (c["token"], c["logprob"], c["bytes"]) == (f"token_id:{tid}", named["logprob"], named["bytes"])
            top_two = list(entry.items())[:2]  # (entries are in rank order)
            assert [t["token"] for t in c["top_logprobs"]] == [f"token_id:{t}" for t, _ in top_two]
            assert [t["logprob"] for t in c["top_logprobs"]] == [lp.logprob for _, lp in top_two]
            assert [bytes(t["bytes"]).decode() for t in c["top_logprobs"]] == [t["token"] for t in c["top_logprobs"]]
    else:
        assert by_id["tokens"] == [f"token_id:{t}" for t in ids]
        assert (by_id["token_logprobs"], by_id["text_offset"]) == (by_text["token_logprobs"], by_text["text_offset"])
        assert by_id["top_logprobs"] == [{f"token_id:{t}": lp.logprob for t, lp in list(entry.items())[:2]}
                                         for entry in entries]
