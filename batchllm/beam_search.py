"""Beam search as vLLM's `LLM.beam_search` runs it: each step asks the engine for one token of every live
beam with its 2 x beam_width most likely next tokens, extends each beam by each of them, and keeps each prompt's
beam_width best (cumulative logprob over length ** length_penalty). A beam that draws EOS is complete; when
max_tokens is reached the live beams are too, and each prompt's beam_width best complete beams are its output.
With structured_outputs every beam keeps to the grammar: a beam's candidates are those its grammar allows next
(`BeamGrammar`), and a beam whose grammar has ended is complete.

Every step is one `generate` call over all live beams of all prompts: a prompt's beams share its prompt and most
of their tokens, which prefix sharing computes once per call, and each step takes the KV the step before left (the
KV cache, `core/prefix_cache.py`, as vLLM's prefix cache keeps it), so it computes only the beams' new tokens, in one
engine step: every beam of a parent takes a copy of the parent's partial last block, and a planned prefix found
whole computes nothing (`core/scheduler.py`). A beam shorter than one block keeps nothing (`core/prefix_cache.py`
records no tail under the root): its steps compute it again.
Writer: `run_beam_search`, of the beams of its own call only (the outputs it returns are the caller's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchllm.request_output import Logprob
from batchllm.sampling_params import BeamSearchParams, SamplingParams
from batchllm.structured import grammar_key


@dataclass
class BeamSearchSequence:
    """One beam: its tokens (the prompt's, then the output's), each output position's logprob dict (the
    candidates it was chosen among) and its cumulative logprob; `text` (the whole sequence decoded, as vLLM's)
    is set on the finished beams returned. vLLM 0.26's fields, in its order (a sequence built by position, as a
    vLLM test's mock builds one, means the same)."""

    orig_prompt: dict | None
    """vLLM's: the prompt the beam grew from, as {"type": "token", "prompt_token_ids": [...]} (and its "prompt" text
    where it was given as text)."""
    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    lora_request: None = None
    """vLLM's: no LoRA is served here, so None."""
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def get_prompt(self) -> dict:
        """vLLM's: the beam as a token prompt (its tokens, with the original prompt's text where it had one), to
        run further."""
        text = (self.orig_prompt or {}).get("prompt")
        return {"type": "token", "prompt_token_ids": list(self.tokens), **({} if text is None else {"prompt": text})}


@dataclass
class BeamSearchOutput:
    """A prompt's beam_width best sequences, best first."""

    sequences: list[BeamSearchSequence]


def beam_score(beam: BeamSearchSequence, eos_ids: frozenset[int], length_penalty: float) -> float:
    """vLLM's (and transformers') score: cumulative logprob over the length (an ending EOS not counted) raised
    to length_penalty; the length counts the prompt, as vLLM's does."""
    length = len(beam.tokens) - (1 if beam.tokens and beam.tokens[-1] in eos_ids else 0)
    return beam.cum_logprob / (max(length, 1) ** length_penalty)


def run_beam_search(llm, prompts: list[list[int]], params: BeamSearchParams,
                    texts: list[str | None] | None = None, use_tqdm: Any = False) -> list[BeamSearchOutput]:
    """Beam search over token prompts (module docstring; `texts`: the prompts given as text, for `orig_prompt`).
    A beam that fills the context is complete. A beam completes at the tokenizer's EOS, as vLLM's; without a
    tokenizer (skip_tokenizer_init, where vLLM refuses beam search) at any id that ends the LLM's requests.
    use_tqdm: as vLLM's, a bar of the steps (its total max_tokens, the most there may be), or a callable that
    makes it (called with total, desc and unit)."""
    bar = _step_bar(use_tqdm, params.max_tokens)
    try:
        return _search(llm, prompts, params, texts, bar)
    finally:
        if bar is not None:
            bar.close()


def _step_bar(use_tqdm: Any, steps: int):
    if not use_tqdm:
        return None
    if callable(use_tqdm):
        return use_tqdm(total=steps, desc="Beam search", unit="token")
    from tqdm import tqdm

    return tqdm(total=steps, desc="Beam search", unit="token")


def _search(llm, prompts: list[list[int]], params: BeamSearchParams, texts: list[str | None] | None,
            bar) -> list[BeamSearchOutput]:
    """`run_beam_search`'s steps; `bar` (or None) counts them."""
    eos = beam_ending_ids(llm)
    origins = [{"type": "token", "prompt_token_ids": list(p), **({} if text is None else {"prompt": text})}
               for p, text in zip(prompts, texts or [None] * len(prompts))]
    step_params = _StepParams(params)
    grammar = None if params.structured_outputs is None else BeamGrammar(llm, params.structured_outputs)
    live = [[BeamSearchSequence(origin, list(p))] for p, origin in zip(prompts, origins)]
    completed: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        allowed: dict[int, AllowedTokens | None] = {}  # id(beam): the tokens its grammar allows next (None: any)
        for index, beams in enumerate(live):  # a beam the context or its grammar cannot extend is complete as it is
            for beam in beams:
                allowed[id(beam)] = None if grammar is None else grammar.allowed_next(beam)
            ended = [len(b.tokens) >= llm.max_model_len or _grammar_ended(allowed[id(b)]) for b in beams]
            completed[index] += [b for b, end in zip(beams, ended) if end]
            live[index] = [b for b, end in zip(beams, ended) if not end]
        beams = [beam for group in live for beam in group]
        if not beams:
            break
        sampling = (step_params.masked_to(None) if grammar is None
                    else [step_params.masked_to(allowed[id(beam)]) for beam in beams])
        outputs = llm.generate([{"prompt_token_ids": beam.tokens} for beam in beams], sampling, use_tqdm=False)
        if bar is not None:
            bar.update(1)
        position = 0
        for index, group in enumerate(live):
            candidates = []
            for beam, output in zip(group, outputs[position:position + len(group)]):
                entry, kept = output.outputs[0].logprobs[0], allowed[id(beam)]
                for token_id, logprob in entry.items():
                    if kept is not None and token_id not in kept:
                        continue  # (the logprobs are the raw distribution's: its top tokens need not be allowed)
                    grown = BeamSearchSequence(beam.orig_prompt, beam.tokens + [token_id], beam.logprobs + [entry],
                                               cum_logprob=beam.cum_logprob + logprob.logprob)
                    (completed[index] if token_id in eos and not params.ignore_eos else candidates).append(grown)
            position += len(group)
            candidates.sort(key=lambda b: beam_score(b, eos, params.length_penalty), reverse=True)
            live[index] = candidates[:params.beam_width]
    return [_best(completed[index] + live[index], llm.tokenizer, eos, params) for index in range(len(prompts))]


MASKED_AT_MOST = 1024
"""vLLM's cap on a beam step's allowed_token_ids: a beam whose grammar allows more tokens (inside a free string)
runs unmasked and keeps only its allowed candidates; one with fewer is masked too, so its sampled token (always among
its candidates) is allowed and the beam cannot run out of them. Masking every beam would cost a vocabulary-long list
per beam per step."""


class _StepParams:
    """The SamplingParams of a beam step: 2 x beam_width logprobs of one token, EOS a candidate like any other (the
    beam completes at it), masked to a grammar's allowed tokens where they are few (one SamplingParams per distinct
    set within a step, so each is checked once)."""

    def __init__(self, params: BeamSearchParams) -> None:
        self._fields = dict(logprobs=2 * params.beam_width, max_tokens=1, temperature=params.temperature,
                            ignore_eos=True)
        self._unmasked = SamplingParams(**self._fields)
        self._masked: dict[tuple[int, ...], SamplingParams] = {}

    def masked_to(self, allowed: AllowedTokens | None) -> SamplingParams:
        if allowed is None or allowed.few is None:
            return self._unmasked
        if allowed.few not in self._masked:
            if len(self._masked) > 4 * MASKED_AT_MOST:  # (a step's sets; a long search would keep every one)
                self._masked.clear()
            self._masked[allowed.few] = SamplingParams(**self._fields, allowed_token_ids=list(allowed.few))
        return self._masked[allowed.few]


@dataclass(frozen=True)
class AllowedTokens:
    """The tokens a beam's grammar allows next: `count` of them, `few` (ascending) where at most MASKED_AT_MOST
    (else None: thousands of ids would cost more to list than the candidates cost to look up)."""

    count: int
    few: tuple[int, ...] | None
    bits: Any
    """A numpy bool per vocabulary id."""

    def __contains__(self, token: int) -> bool:
        return 0 <= token < len(self.bits) and bool(self.bits[token])


def _grammar_ended(allowed: AllowedTokens | None) -> bool:
    return allowed is not None and allowed.count == 0


class BeamGrammar:
    """vLLM's structured beam search: each step, each live beam's matcher is made afresh and replayed over its output
    tokens (a matcher cannot be copied for each child), then says the tokens allowed next. The grammar's stop tokens
    are the engine's EOS ids; a beam ends at the tokenizer's alone (`beam_ending_ids`), so the others are never
    allowed, as vLLM's grammar (its stop token the tokenizer's EOS) never allows them."""

    def __init__(self, llm, structured_outputs) -> None:
        if llm.prompts.grammars is None:
            raise ValueError("BeamSearchParams.structured_outputs needs a tokenizer (skip_tokenizer_init is set)")
        self._grammars, self._key = llm.prompts.grammars, grammar_key(structured_outputs)
        self._bitmask = self._grammars.allocate_bitmask(1)
        self._not_ending = sorted(t for t in set(llm.eos_token_ids) - beam_ending_ids(llm)
                                  if t < self._grammars.vocab_size)

    def allowed_next(self, beam: BeamSearchSequence) -> AllowedTokens:
        """The tokens the grammar allows after `beam`'s outputs; none once it has ended (it took its stop token and
        the beam went on: ignore_eos)."""
        state = self._grammars.new_state(self._key)
        state.advance(beam.tokens[len(beam.orig_prompt["prompt_token_ids"]):])
        if not state.fill(self._bitmask, 0):
            return AllowedTokens(0, (), None)
        bits = np.unpackbits(self._bitmask[0].numpy().view(np.uint8), bitorder="little")[:self._grammars.vocab_size]
        bits[self._not_ending] = 0
        count = int(bits.sum())
        few = tuple(np.flatnonzero(bits).tolist()) if count <= MASKED_AT_MOST else None
        return AllowedTokens(count, few, bits.astype(bool))


def beam_ending_ids(llm) -> frozenset[int]:
    """The ids that complete a beam (`run_beam_search`)."""
    if llm.tokenizer is None:
        return frozenset(llm.eos_token_ids)
    eos = getattr(llm.tokenizer, "eos_token_id", None)
    return frozenset() if eos is None else frozenset({eos})


def _best(beams: list[BeamSearchSequence], tokenizer: Any, eos: frozenset[int],
          params: BeamSearchParams) -> BeamSearchOutput:
    best = sorted(beams, key=lambda b: beam_score(b, eos, params.length_penalty), reverse=True)[:params.beam_width]
    for beam in best:
        beam.text = tokenizer.decode(beam.tokens) if tokenizer is not None else None
    return BeamSearchOutput(best)
