"""A step's sampling rows go through the LM head and the sampler in slices of at most
`sampler.LOGITS_PER_SLICE` logits, so its memory is bounded whatever its row count (one piece of ~8,000
sampled rows ran an H100 out of memory: docs/benchmarks.md, session 47). Slicing must change nothing a user
sees: on SmolLM2 (fp32, CPU) a batch of greedy, seeded top-p, penalised, logprob, prompt-logprob and
structured rows gives the same tokens and logprobs in slices of 3 rows as in one piece, and no LM-head call
then takes more than 3 rows."""

from __future__ import annotations

import importlib.util

import pytest

from batchllm import SamplingParams
from batchllm.layers import sampler
from batchllm.layers.sampler import FORBIDDEN_LOGPROB

pytestmark = pytest.mark.slow

ROWS_PER_SLICE = 3


def mixed_params() -> list[SamplingParams]:
    """Rows of every kind the sampler tells apart, mixed so that slices of 3 cut across kinds (and across
    logprob tables of different widths)."""
    kinds = [
        dict(temperature=0),
        dict(temperature=0.8, top_p=0.9, seed=11, logprobs=3),
        dict(temperature=0, logprobs=1, prompt_logprobs=2),
        dict(temperature=1.0, top_k=20, seed=5),
        dict(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, logprobs=5),
        dict(temperature=0.7, min_p=0.05, seed=3, frequency_penalty=0.4),
        dict(temperature=0, min_tokens=4, stop_token_ids=[2]),
    ]
    if importlib.util.find_spec("xgrammar") is not None:
        kinds += [dict(temperature=0, structured_outputs={"choice": ["yes", "no", "maybe"]}),
                  dict(temperature=0.9, seed=7, structured_outputs={"regex": r"\d{3}-\d{2}"}, logprobs=2)]
    return [SamplingParams(max_tokens=8, **kinds[i % len(kinds)]) for i in range(2 * len(kinds) + 1)]


def prompts(count: int) -> list[str]:
    return [f"Question {i}: name a colour, then a number below {10 + i}." for i in range(count)]


def run(llm, monkeypatch, rows_per_slice: int | None) -> tuple[list, int]:
    """The outputs of the mixed batch, and the most rows any LM-head call took."""
    if rows_per_slice is not None:
        monkeypatch.setattr(sampler, "LOGITS_PER_SLICE", rows_per_slice * llm.engine.model_spec.vocab_size)
    model = llm.engine.model
    widest = 0
    compute_logits = model.compute_logits

    def counting(hidden):
        nonlocal widest
        widest = max(widest, hidden.shape[0])
        return compute_logits(hidden)
    monkeypatch.setattr(model, "compute_logits", counting)
    params = mixed_params()
    outputs = llm.generate(prompts(len(params)), params, use_tqdm=False)
    monkeypatch.undo()
    return outputs, widest


def allowed(row: dict) -> dict:
    """A logprob row's entries but the tokens a grammar forbids: those tie at FORBIDDEN_LOGPROB, and which of
    them fill a top-k table depends on the shape topk runs on."""
    return {token: entry for token, entry in row.items() if entry.logprob > FORBIDDEN_LOGPROB}


def test_sliced_sampling_gives_what_one_piece_gives(default_llm, monkeypatch):
    whole, widest_whole = run(default_llm, monkeypatch, None)
    sliced, widest_sliced = run(default_llm, monkeypatch, ROWS_PER_SLICE)
    assert widest_whole > ROWS_PER_SLICE, "the batch must sample more rows in one step than a slice holds"
    assert widest_sliced <= ROWS_PER_SLICE
    for a, b in zip(whole, sliced, strict=True):
        x, y = a.outputs[0], b.outputs[0]
        assert x.token_ids == y.token_ids, a.request_id
        assert (x.logprobs is None) == (y.logprobs is None)
        for row_x, row_y in zip(x.logprobs or [], y.logprobs or [], strict=True):
            assert allowed(row_x).keys() == allowed(row_y).keys() and len(row_x) == len(row_y)
            for token, entry in allowed(row_x).items():
                assert entry.logprob == pytest.approx(row_y[token].logprob, abs=1e-4)
                assert entry.rank == row_y[token].rank
        assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
        for row_x, row_y in zip(a.prompt_logprobs or [], b.prompt_logprobs or [], strict=True):
            assert (row_x or {}).keys() == (row_y or {}).keys()
