"""The measured activation reserve on the GPU (`runner.activation_profile`): an engine whose KV cache is sized
from the card measures one, and the steps that stress activations the most (full prefill steps, a step of
thousands of sampling rows with top-p and logprobs, prompt logprobs over whole prompts) never allocate more
beyond the built engine than it reserved. The SmolLM2-135M shape with dummy weights, default settings (and a
small max_num_seqs for prompt logprobs)."""

import random

import pytest
import torch

from batchllm import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL = "benchmarks/configs/smollm2-135m"


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


CASES = {
    "prefill": lambda rng: ([{"prompt_token_ids": tokens(rng, 6000)} for _ in range(12)],
                            SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)),
    "wide_sampled": lambda rng: ([{"prompt_token_ids": tokens(rng, 24)} for _ in range(6000)],
                                 SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, top_p=0.9,
                                                logprobs=5)),
    "prompt_logprobs": lambda rng: ([{"prompt_token_ids": tokens(rng, 3000)} for _ in range(8)],
                                    SamplingParams(max_tokens=2, ignore_eos=True, temperature=0, prompt_logprobs=5)),
}


def build(**options) -> LLM:
    return LLM(MODEL, load_format="dummy", skip_tokenizer_init=True, **options)


@pytest.fixture(scope="module")
def llm():
    engine = build()
    yield engine
    engine.shutdown()


def peak_within_reserve(llm: LLM, case: str) -> None:
    """Runs `case`: every request gets its tokens, and torch's peak over the built engine stays in its reserve."""
    reserve = llm.engine.kv_spec.activation_reserve
    assert reserve is not None and reserve.step > 0 and reserve.attention > 0 and reserve.tables > 0
    prompts, params = CASES[case](random.Random(0))
    torch.cuda.synchronize()
    built = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in outputs)
    assert torch.cuda.max_memory_allocated() - built <= reserve.total, reserve.describe()
    assert llm.last_stats["activation_reserve_gib"] == reserve.total / 2**30  # (what --stats reports)


@pytest.mark.parametrize("case", sorted(CASES))
def test_steps_stay_inside_the_measured_reserve(llm, case):
    peak_within_reserve(llm, case)


def test_prompt_logprobs_stay_inside_the_reserve_with_few_sequences():
    """With max_num_seqs 4 the sampling slice is 4 rows, while a prompt-logprob slice still takes as many rows as
    the vocabulary allows: the reserve measures that slice too."""
    capped = build(max_num_seqs=4)
    try:
        peak_within_reserve(capped, "prompt_logprobs")
    finally:
        capped.shutdown()
