"""`LLM.beam_search`, vLLM's algorithm, against the same algorithm run on transformers' logprobs (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from batchllm.beam_search import BeamSearchOutput
from batchllm.sampling_params import BeamSearchParams


def reference_beam_search(model, prompt: list[int], params: BeamSearchParams,
                          eos: int) -> list[tuple[list[int], float]]:
    """vLLM's steps on transformers' next-token logprobs: each live beam grows by its 2 x beam_width most likely
    tokens, EOS completes a beam, each step keeps the beam_width best by score."""
    def next_logprobs(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].float(), dim=-1)

    return reference_on(next_logprobs, prompt, params, eos)


def reference_on(next_logprobs, prompt: list[int], params: BeamSearchParams, eos: int,
                 allowed_after=None) -> list[tuple[list[int], float]]:
    """vLLM's steps over any next-token logprobs (`next_logprobs(tokens)`: [vocab]). With `allowed_after` (the
    tokens a grammar allows after a beam's outputs), vLLM 0.26's structured search: a beam's candidates are its
    2 x beam_width most likely tokens and its sampled one (greedy; masked to the allowed tokens where they are at
    most 1,024), those the grammar allows kept; a beam the grammar lets go no further is complete."""
    def score(entry):  # vLLM's, written out: the length counts the prompt, an ending EOS does not
        tokens, cum = entry
        return cum / ((len(tokens) - (tokens[-1] == eos)) ** params.length_penalty)

    live, done = [(prompt, 0.0)], []
    for _ in range(params.max_tokens):
        grown = []
        for tokens, cum in live:
            allowed = None if allowed_after is None else allowed_after(tokens[len(prompt):])
            if allowed is not None and not allowed:
                done.append((tokens, cum))
                continue
            logprobs = next_logprobs(tokens)
            top = torch.topk(logprobs, 2 * params.beam_width).indices.tolist()
            if allowed is not None:
                sampled = max(allowed, key=lambda t: logprobs[t]) if len(allowed) <= 1024 else int(logprobs.argmax())
                top = [t for t in dict.fromkeys([sampled, *top]) if t in allowed]
            for token in top:
                (done if token == eos and not params.ignore_eos else grown).append(
                    (tokens + [token], cum + float(logprobs[token])))
        live = sorted(grown, key=score, reverse=True)[:params.beam_width]
    return sorted(done + live, key=score, reverse=True)[:params.beam_width]


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_matches_the_algorithm_on_transformers_logprobs(tiny_model_factory, length_penalty):
    from transformers import AutoModelForCausalLM

    from batchllm import LLM

    model_dir = tiny_model_factory("llama")
    params = BeamSearchParams(beam_width=3, max_tokens=5, length_penalty=length_penalty)
    prompts = [[5, 6, 7, 8], [5, 6, 9], [100, 200, 300, 400, 500]]  # two share a prefix: shared in each step
    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=64)
    try:
        outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
        eos = llm.tokenizer.eos_token_id
    finally:
        llm.shutdown()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        assert isinstance(output, BeamSearchOutput) and len(output.sequences) == params.beam_width
        expected = reference_beam_search(model, prompt, params, eos)
        assert [s.tokens for s in output.sequences] == [tokens for tokens, _ in expected]
        assert [s.cum_logprob for s in output.sequences] == pytest.approx([cum for _, cum in expected], abs=1e-4)
        for sequence in output.sequences:
            assert len(sequence.logprobs) == len(sequence.tokens) - len(prompt)
            assert all(token in entry for token, entry in zip(sequence.tokens[len(prompt):], sequence.logprobs))


def test_beam_search_on_text_ends_beams_at_eos_and_decodes_the_whole_sequence(default_llm):
    """vLLM's text is the whole sequence decoded (prompt included); a beam that draws EOS is complete."""
    params = BeamSearchParams(beam_width=2, max_tokens=12)
    (output,) = default_llm.beam_search("The capital of France is", params)
    best = output.sequences[0]
    assert best.text == default_llm.tokenizer.decode(best.tokens) and best.text.startswith("The capital of France is")
    assert " Paris" in best.text
    eos = default_llm.tokenizer.eos_token_id
    scores = [s.cum_logprob / (len(s.tokens) - (s.tokens[-1] == eos)) for s in output.sequences]  # (vLLM's score)
    assert scores == sorted(scores, reverse=True), "best first, by score"
    assert best.tokens[-1] == eos, "the best beam ended at EOS: complete before max_tokens"
    with pytest.raises(ValueError, match="beam_width must be a positive integer"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    assert BeamSearchParams(beam_width=2, max_tokens=4, structured_outputs=None).structured_outputs is None
    with pytest.raises(TypeError, match="params must be a BeamSearchParams"):
        default_llm.beam_search("Hi", {"beam_width": 2})


@pytest.mark.parametrize(("constraint", "ignore_eos"), [("choice", False), ("choice", True), ("regex", False)])
def test_structured_beams_are_vllms_kept_to_the_grammar(tiny_model_factory, constraint, ignore_eos):
    """BeamSearchParams.structured_outputs (vLLM 0.26's): every beam is kept to the grammar, against vLLM's steps
    on transformers' logprobs with the allowed tokens worked out here from each token's text. The choices allow a
    few tokens at a time (each beam step masked to them); [a-z]+ allows thousands (unmasked, candidates filtered).
    Under ignore_eos a beam goes on past EOS, and its grammar, ended there, makes it complete."""
    from transformers import AutoModelForCausalLM

    from batchllm import LLM

    model_dir = tiny_model_factory("llama")
    llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=64)
    try:
        tokenizer, stops = llm.tokenizer, set(llm.eos_token_ids)
        texts = [tokenizer.decode([t]) for t in range(llm.model_spec.vocab_size)]
        special = set(tokenizer.all_special_ids)
        if constraint == "choice":
            choices = ["yes", "no", "not sure", "maybe so"]
            structured = {"choice": choices}

            def allowed_after(outputs):
                said = tokenizer.decode(outputs)
                ids = {t for t, text in enumerate(texts) if text and t not in special
                       and any(c.startswith(said + text) for c in choices)}
                return ids | (stops if said in choices else set())
        else:
            structured = {"regex": "[a-z]+"}
            lower = {t for t, text in enumerate(texts) if text and t not in special and text.isascii()
                     and text.isalpha() and text.islower()}
            assert len(lower) > 1024, "the unmasked path"

            def allowed_after(outputs):
                return lower | (stops if outputs else set())

        params = BeamSearchParams(beam_width=3, max_tokens=5, structured_outputs=structured, ignore_eos=ignore_eos)
        prompts = [[5, 6, 7, 8], [100, 200, 300]]
        outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
        eos = tokenizer.eos_token_id
    finally:
        llm.shutdown()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def next_logprobs(tokens):
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].float(), dim=-1)

    for prompt, output in zip(prompts, outputs):
        expected = reference_on(next_logprobs, prompt, params, eos, allowed_after)
        assert [s.tokens for s in output.sequences] == [tokens for tokens, _ in expected]
        assert [s.cum_logprob for s in output.sequences] == pytest.approx([cum for _, cum in expected], abs=1e-4)
        if constraint == "choice":  # (the tiny model's beams do finish some answers)
            finished = [s for s in output.sequences if s.tokens[-1] == eos]
            assert finished and all(tokenizer.decode(s.tokens[len(prompt):-1]) in choices for s in finished)


def test_structured_beams_end_only_at_the_tokenizers_eos(tmp_path, default_model_dir):
    """A model whose generation_config names a second EOS id (Qwen2.5-Instruct's <|endoftext|>, Llama 3's
    <|end_of_text|>): the engine's grammar stops at either, but a beam ends at the tokenizer's alone, so a beam that
    drew the other stayed live and came back with it in its text. vLLM's grammar, whose stop token is the
    tokenizer's, never allows it."""
    import json

    from batchllm import LLM
    from tests.helpers import make_tiny_model

    model_dir = make_tiny_model("llama", tmp_path / "m", tokenizer_dir=default_model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    llm = LLM(str(model_dir), device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=64)
    try:
        assert set(llm.eos_token_ids) == {0, 2} and llm.tokenizer.eos_token_id == 2
        params = BeamSearchParams(beam_width=4, max_tokens=6, structured_outputs={"choice": ["yes", "no", "maybe"]})
        outputs = llm.beam_search([{"prompt_token_ids": p} for p in ([5, 6, 7], [9, 10], [300, 301, 302, 303])],
                                  params)
    finally:
        llm.shutdown()
    beams = [s for o in outputs for s in o.sequences]
    assert beams and all(0 not in s.tokens for s in beams)
    assert any(s.tokens[-1] == 2 for s in beams)


def test_structured_beams_need_a_grammar_that_compiles_and_a_tokenizer(default_llm, tiny_model_factory):
    from batchllm import LLM
    from batchllm.structured import StructuredOutputError

    coerced = BeamSearchParams(beam_width=2, max_tokens=4, structured_outputs={"choice": ["a"]}).structured_outputs
    assert coerced.choice == ["a"]
    with pytest.raises(ValueError, match="exactly one of"):
        BeamSearchParams(beam_width=2, max_tokens=4, structured_outputs={"choice": ["a"], "regex": "b"})
    with pytest.raises(StructuredOutputError, match="regex cannot be compiled"):
        default_llm.beam_search("Hi", BeamSearchParams(beam_width=2, max_tokens=4, structured_outputs={"regex": "("}))
    (answer,) = default_llm.beam_search("Is Paris in France? Answer yes or no.",
                                        BeamSearchParams(beam_width=2, max_tokens=4,
                                                         structured_outputs={"choice": ["yes", "no"]}))
    assert {default_llm.tokenizer.decode(s.tokens[-2:-1]) for s in answer.sequences} <= {"yes", "no"}
    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", skip_tokenizer_init=True)
    try:
        with pytest.raises(ValueError, match="structured_outputs needs a tokenizer"):
            llm.beam_search([{"prompt_token_ids": [5, 6]}],
                            BeamSearchParams(beam_width=2, max_tokens=2, structured_outputs={"choice": ["a"]}))
    finally:
        llm.shutdown()


def test_beams_without_a_tokenizer_complete_at_the_models_eos_as_with_one(default_llm, default_model_dir):
    """vLLM refuses beam search under skip_tokenizer_init; here a beam completes at the ids that end the LLM's
    requests (the model's EOS), so the beams are those of an LLM with its tokenizer, without their text. Each beam
    names the prompt it grew from (vLLM's orig_prompt)."""
    from batchllm import LLM

    params = BeamSearchParams(beam_width=2, max_tokens=10)
    prompt = default_llm.tokenizer.encode("The capital of France is")
    (expected,) = default_llm.beam_search([{"prompt_token_ids": prompt}], params)
    assert expected.sequences[0].tokens[-1] == default_llm.tokenizer.eos_token_id, "a beam ended at EOS"
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu", max_model_len=2048, skip_tokenizer_init=True)
    try:
        (output,) = llm.beam_search([{"prompt_token_ids": prompt}], params)
    finally:
        llm.shutdown()
    assert [s.tokens for s in output.sequences] == [s.tokens for s in expected.sequences]
    assert all(s.text is None for s in output.sequences)
    assert output.sequences[0].orig_prompt == {"type": "token", "prompt_token_ids": prompt}
    assert output.sequences[0].lora_request is None
    (worded,) = default_llm.beam_search("Hi", BeamSearchParams(beam_width=2, max_tokens=2))
    assert worded.sequences[0].orig_prompt["prompt"] == "Hi"


def test_a_search_the_kv_cache_cannot_hold_is_refused_before_its_first_step(tiny_model_factory):
    """A prompt whose max_tokens the cache cannot hold is refused by its own index before any step, as generate
    refuses it: it had failed part-way, losing the finished steps, naming "prompt 2" of a step's beams."""
    import numpy as np

    from batchllm import LLM

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", skip_tokenizer_init=True,
              block_size=16, num_kv_blocks=3)
    steps = []
    generate = llm.generate
    llm.generate = lambda *args, **kwargs: steps.append(1) or generate(*args, **kwargs)
    try:
        prompts = [{"prompt_token_ids": list(range(3, 13))}, {"prompt_token_ids": list(range(3, 43))}]
        with pytest.raises(ValueError, match=r"^prompt 1: the prompt \(40 tokens\).*cache holds 48"):
            llm.beam_search(prompts, BeamSearchParams(beam_width=2, max_tokens=12))
        assert not steps
        for limit in (0, -1, True, 2.0):
            with pytest.raises(ValueError, match="concurrency_limit must be a positive integer"):
                llm.beam_search(prompts[:1], BeamSearchParams(beam_width=2, max_tokens=2), concurrency_limit=limit)
        params = BeamSearchParams(beam_width=np.int64(2), max_tokens=np.int32(3), length_penalty=np.float32(1.0),
                                  ignore_eos=np.bool_(True))
        assert (type(params.beam_width), type(params.max_tokens), type(params.ignore_eos)) == (int, int, bool)
        (output,) = llm.beam_search(prompts[:1], params, concurrency_limit=1)
        assert [len(s.tokens) for s in output.sequences] == [13, 13]
        (output,) = llm.beam_search(prompts[:1], BeamSearchParams(beam_width=2, max_tokens=0))  # vLLM: no step
        assert [(s.tokens, s.cum_logprob) for s in output.sequences] == [(list(range(3, 13)), 0.0)]
        with pytest.raises(ValueError, match="max_tokens must be a non-negative integer"):
            BeamSearchParams(beam_width=2, max_tokens=-1)
    finally:
        llm.shutdown()


def test_beam_search_shows_a_bar_of_its_steps_as_vllm_does(tiny_model_factory, capsys, caplog):
    """use_tqdm had no effect: as vLLM's, it is a bar of the steps (total max_tokens), none with concurrency_limit
    (a warning says so); a callable makes the bar."""
    import logging

    from batchllm import LLM

    made = []

    class Bar:
        def __init__(self, **kwargs):
            self.kwargs, self.steps, self.closed = kwargs, 0, False
            made.append(self)

        def update(self, n):
            self.steps += n

        def close(self):
            self.closed = True

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", skip_tokenizer_init=True, num_kv_blocks=32)
    prompt, params = [{"prompt_token_ids": list(range(3, 13))}], BeamSearchParams(beam_width=2, max_tokens=3,
                                                                                  ignore_eos=True)
    try:
        llm.beam_search(prompt, params, use_tqdm=Bar)
        assert [(b.kwargs, b.steps, b.closed) for b in made] == [
            ({"total": 3, "desc": "Beam search", "unit": "token"}, 3, True)]
        capsys.readouterr()
        llm.beam_search(prompt, params, use_tqdm=True)
        assert "Beam search" in capsys.readouterr().err
        with caplog.at_level(logging.WARNING, logger="batchllm"):
            llm.beam_search(prompt, params, use_tqdm=Bar, concurrency_limit=1)
        assert len(made) == 1 and "not shown with concurrency_limit" in caplog.text
    finally:
        llm.shutdown()


SCRIPTED_EOS = 0
SCRIPTED_PROMPT = [2, 6, 7]  # beams complete at EOS after 1, 3 and 4 tokens


def scripted_logprobs(tokens: list[int]) -> torch.Tensor:
    """A fixed distribution over 8 tokens for each sequence (a function of the sequence alone), under which EOS
    (token 0) is often among a beam's candidates, so beams complete at different lengths."""
    seed = sum((i + 1) * (t + 1) for i, t in enumerate(tokens)) % (2**31)
    return torch.log_softmax(2 * torch.randn(8, generator=torch.Generator().manual_seed(seed)), dim=-1)


class ScriptedLLM:
    """What `run_beam_search` asks of an LLM: each `generate` call answers a prompt's one step with its 2 x
    beam_width most likely next tokens under `scripted_logprobs`."""

    max_model_len = 64

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.tokenizer = SimpleNamespace(eos_token_id=SCRIPTED_EOS, decode=lambda ids: " ".join(map(str, ids)))

    def generate(self, prompts, params, use_tqdm=False):
        from types import SimpleNamespace

        from batchllm.request_output import Logprob

        answers = []
        for prompt in prompts:
            top = torch.topk(scripted_logprobs(prompt["prompt_token_ids"]), params.logprobs)
            entry = {t: Logprob(v, rank + 1) for rank, (t, v) in enumerate(zip(top.indices.tolist(),
                                                                                top.values.tolist()))}
            answers.append(SimpleNamespace(outputs=[SimpleNamespace(logprobs=[entry])]))
        return answers


@pytest.mark.parametrize("length_penalty", [0.5, 1.0, 2.0])
def test_beams_ending_at_eos_at_different_lengths_rank_by_the_length_penalty(length_penalty):
    """The tiny model never offers EOS, so the test above ranks beams of one length, where length_penalty changes
    nothing; here beams complete at EOS after 1 to 6 tokens, and the ranking follows vLLM's score (an ending EOS
    not counted in the length)."""
    from batchllm.beam_search import run_beam_search

    params = BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=length_penalty)
    prompt = SCRIPTED_PROMPT
    outputs = run_beam_search(ScriptedLLM(), [prompt], params)
    expected = reference_on(scripted_logprobs, prompt, params, SCRIPTED_EOS)
    assert [s.tokens for s in outputs[0].sequences] == [tokens for tokens, _ in expected]
    assert [s.cum_logprob for s in outputs[0].sequences] == pytest.approx([cum for _, cum in expected], abs=1e-5)


def test_the_scripted_beams_differ_in_length_and_in_order_across_length_penalties():
    """The scripted distribution does exercise the score: completed beams of several lengths, and another best
    ranking under length_penalty 2.0 than under 0.5 and 1.0."""
    best = {lp: reference_on(scripted_logprobs, SCRIPTED_PROMPT, BeamSearchParams(beam_width=3, max_tokens=6,
                                                                                  length_penalty=lp), SCRIPTED_EOS)
            for lp in (0.5, 1.0, 2.0)}
    lengths = {len(tokens) for beams in best.values() for tokens, _ in beams if tokens[-1] == SCRIPTED_EOS}
    assert len(lengths) >= 2, best
    assert [t for t, _ in best[0.5]] != [t for t, _ in best[2.0]] != [t for t, _ in best[1.0]], best


def test_a_beam_sequence_takes_vllms_fields_in_vllms_order():
    """BeamSearchSequence took (tokens, logprobs, cum_logprob, orig_prompt, ...): one built by position, as vLLM's
    (orig_prompt, tokens, logprobs, lora_request, cum_logprob, ...), put the prompt dict in its tokens. vLLM's
    get_prompt() was missing too."""
    import dataclasses

    from batchllm.beam_search import BeamSearchSequence

    assert [f.name for f in dataclasses.fields(BeamSearchSequence)] == [
        "orig_prompt", "tokens", "logprobs", "lora_request", "cum_logprob", "text", "finish_reason", "stop_reason"]
    beam = BeamSearchSequence({"type": "token", "prompt_token_ids": [1, 2], "prompt": "Hi"}, [1, 2, 7], [{}], None,
                              -0.5)
    assert (beam.tokens, beam.cum_logprob) == ([1, 2, 7], -0.5)
    assert beam.get_prompt() == {"type": "token", "prompt_token_ids": [1, 2, 7], "prompt": "Hi"}
