"""Beam search as vLLM's `LLM.beam_search` runs it: each step asks the engine for one token of every live
beam with its 2 x beam_width most likely next tokens, extends each beam by each of them, and keeps each prompt's
beam_width best (cumulative logprob over length ** length_penalty). A beam that draws EOS is complete; when
max_tokens is reached the live beams are too, and each prompt's beam_width best complete beams are its output.

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

from batchllm.request_output import Logprob
from batchllm.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class BeamSearchSequence:
    """One beam: its tokens (the prompt's, then the output's), each output position's logprob dict (the
    candidates it was chosen among) and its cumulative logprob; `text` (the whole sequence decoded, as vLLM's)
    is set on the finished beams returned."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    orig_prompt: dict | None = None
    """vLLM's: the prompt the beam grew from, as {"type": "token", "prompt_token_ids": [...]} (and its "prompt" text
    where it was given as text)."""
    lora_request: None = None
    """vLLM's: no LoRA is served here, so None."""
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


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
    step_params = SamplingParams(logprobs=2 * params.beam_width, max_tokens=1, temperature=params.temperature,
                                 ignore_eos=True)  # (EOS is a candidate like any other: the beam completes)
    live = [[BeamSearchSequence(list(p), orig_prompt=origin)] for p, origin in zip(prompts, origins)]
    completed: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        for index, beams in enumerate(live):  # a beam the context cannot extend is complete as it is
            completed[index] += [b for b in beams if len(b.tokens) >= llm.max_model_len]
            live[index] = [b for b in beams if len(b.tokens) < llm.max_model_len]
        beams = [beam for group in live for beam in group]
        if not beams:
            break
        outputs = llm.generate([{"prompt_token_ids": beam.tokens} for beam in beams], step_params, use_tqdm=False)
        if bar is not None:
            bar.update(1)
        position = 0
        for index, group in enumerate(live):
            candidates = []
            for beam, output in zip(group, outputs[position:position + len(group)]):
                entry = output.outputs[0].logprobs[0]
                for token_id, logprob in entry.items():
                    grown = BeamSearchSequence(beam.tokens + [token_id], beam.logprobs + [entry],
                                               beam.cum_logprob + logprob.logprob, orig_prompt=beam.orig_prompt)
                    (completed[index] if token_id in eos and not params.ignore_eos else candidates).append(grown)
            position += len(group)
            candidates.sort(key=lambda b: beam_score(b, eos, params.length_penalty), reverse=True)
            live[index] = candidates[:params.beam_width]
    return [_best(completed[index] + live[index], llm.tokenizer, eos, params) for index in range(len(prompts))]


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
