"""The sampler on distributions the test controls: supports of top-k / top-p / min-p, seeds, logprobs."""

from __future__ import annotations

import math

import torch

from batchllm.layers.sampler import processed_probs, sample_on_device
from batchllm.outputs import SamplingSpec


def _sample(*args, **kwargs):
    """Sample on the device and read the tokens and logprobs back (what the runner does in two steps)."""
    return sample_on_device(*args, **kwargs).lists()


# probabilities 0.4, 0.3, 0.15, 0.1, 0.05 on tokens 0..4 (and ~0 elsewhere)
PROBS = [0.4, 0.3, 0.15, 0.1, 0.05]


def logits_row(vocab=8):
    row = torch.full((vocab,), -1e9)
    row[: len(PROBS)] = torch.log(torch.tensor(PROBS))
    return row


def spec(**kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, num_logprobs=None)
    base.update(kw)
    return SamplingSpec(**base)


def support(**kw) -> set[int]:
    p = processed_probs(logits_row()[None, :], [spec(**kw)])[0]
    return set(torch.nonzero(p > 1e-6).flatten().tolist())


def drawn(n=2000, **kw) -> set[int]:
    logits = logits_row()[None, :].repeat(n, 1)
    gen = torch.Generator().manual_seed(0)
    tokens, _ = _sample(logits, [spec(**kw)] * n, None, gen)
    return set(tokens)


def test_top_k_keeps_the_k_most_likely():
    assert support(top_k=2) == {0, 1}
    assert drawn(top_k=2) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    assert support(top_p=0.5) == {0, 1}  # 0.4 < 0.5, 0.4 + 0.3 >= 0.5
    assert support(top_p=0.69) == {0, 1}  # 0.4 + 0.3 reaches 0.69: the third is not needed
    # (not top_p=0.7 itself: the softmax's sum of the first two lands one float32 ulp either side of 0.7,
    # depending on the CPU's exp kernel)
    assert support(top_p=0.71) == {0, 1, 2}
    assert support(top_p=0.1) == {0}
    assert drawn(top_p=0.5) == {0, 1}


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    assert support(min_p=0.3) == {0, 1, 2}  # threshold 0.12
    assert support(min_p=0.5) == {0, 1}  # threshold 0.2
    assert drawn(min_p=0.5) == {0, 1}


def test_filters_compose_and_renormalise():
    p = processed_probs(logits_row()[None, :], [spec(top_k=3, top_p=0.6)])[0]
    assert torch.allclose(p[:2], torch.tensor([0.4, 0.3]) / 0.7, atol=1e-6)
    assert float(p[2:].sum()) < 1e-6


def test_unfiltered_sampling_follows_the_distribution():
    n = 20000
    tokens = torch.tensor(list(drawn_tokens(n)))
    freq = torch.bincount(tokens, minlength=5)[:5].float() / n
    assert torch.allclose(freq, torch.tensor(PROBS), atol=0.02)


def drawn_tokens(n):
    logits = logits_row()[None, :].repeat(n, 1)
    tokens, _ = _sample(logits, [spec()] * n, None, torch.Generator().manual_seed(1))
    return tokens


def test_greedy_is_argmax_and_banned_tokens_are_never_chosen():
    logits = logits_row()[None, :].repeat(2, 1)
    specs = [spec(temperature=0.0), spec(temperature=0.0, banned_token_ids=(0,))]
    tokens, _ = _sample(logits, specs, None, torch.Generator().manual_seed(0))
    assert tokens == [0, 1]


def test_banned_ids_outside_the_vocabulary_ban_nothing_and_never_index():
    """stop_token_ids take any integers (as vLLM 0.26): below min_tokens they reach banned_token_ids, and one
    outside [0, vocab) indexed the logits out of range (a device assert on a GPU; 2**70 overflowed int64) or, if
    negative, wrapped around to ban another token. Such ids name no token: nothing is banned for them."""
    logits = logits_row()[None, :].repeat(3, 1)
    specs = [spec(temperature=0.0, banned_token_ids=(-8, -1, 8, 2**70)),
             spec(temperature=0.0, banned_token_ids=(-8, 0, 9)), spec(temperature=0.0, banned_token_ids=(-7,))]
    tokens, _ = _sample(logits, specs, None, torch.Generator().manual_seed(0))
    assert tokens == [0, 1, 0]
    probs = processed_probs(logits_row()[None, :], [spec(banned_token_ids=(-1, 8))])[0]
    assert probs[7] == 0 and math.isclose(probs[0].item(), 0.4, rel_tol=1e-5), "row unchanged by the bans"


def test_a_seeded_row_does_not_depend_on_its_neighbours():
    def run(batch_before: int, seeded_neighbours: bool = False):
        n = batch_before + 1
        logits = torch.randn(n, 50, generator=torch.Generator().manual_seed(batch_before))
        logits[-1] = torch.linspace(0, 3, 50)
        specs = [spec(seed=i if seeded_neighbours else None) for i in range(batch_before)] + [spec(seed=1234)]
        return [_sample(logits, specs, [position] * n, torch.Generator().manual_seed(batch_before))[0][-1]
                for position in range(20, 30)]

    alone = run(0)
    assert alone == run(3) == run(7) == run(5, seeded_neighbours=True)
    assert len(set(alone)) > 1  # the positions draw apart


def _mix(x: int) -> int:
    """lowbias32 of a uint32, in Python ints: the test's own statement of `seeded_noise`'s hash."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def row_key(seed: int, position: int) -> int:
    """A seeded row's key as `seeded_noise`'s docstring defines it (seed modulo 2^64, split in halves)."""
    seed &= (1 << 64) - 1
    return _mix(_mix(_mix(seed & 0xFFFFFFFF) ^ (seed >> 32) ^ 0x9E3779B9) ^ (position & 0xFFFFFFFF))


def test_a_seeded_row_draws_from_its_seed_and_position_alone():
    """The noise is a function of (seed, position, token): the same pair draws the same token in any
    call, another seed or position draws afresh; seeds are taken modulo 2^64."""
    from batchllm.layers.seeded_noise import row_keys, seeded_exponential

    n = 64
    logits = torch.zeros(n, 50)  # uniform: every token equally likely, so each draw shows the noise alone
    tokens = _sample(logits, [spec(seed=s) for s in range(n)], [7] * n, torch.Generator())[0]
    high = _sample(logits, [spec(seed=s + 2**32) for s in range(n)], [7] * n, torch.Generator())[0]
    assert high != tokens
    assert tokens == _sample(logits, [spec(seed=s) for s in range(n)], [7] * n, torch.Generator().manual_seed(9))[0]
    assert tokens != _sample(logits, [spec(seed=s) for s in range(n)], [8] * n, torch.Generator())[0]
    assert len(set(tokens)) > 20  # different seeds draw apart
    modular = row_keys([-1, 2**64 - 1, 2**64 - 2], [3, 3, 3]).tolist()
    assert modular[0] == modular[1] != modular[2]
    assert len(set(row_keys([1, 1 + 2**32], [3, 3]).tolist())) == 2  # the seed's high 32 bits count
    rng = torch.Generator().manual_seed(5)
    seeds = [int(s) for s in torch.randint(-(2**63), 2**63 - 1, (200,), generator=rng)] + [2**64 - 1, 2**40, -(2**63)]
    positions = [int(p) for p in torch.randint(0, 2**31 - 1, (len(seeds),), generator=rng)]
    assert row_keys(seeds, positions).tolist() == [row_key(s, p) for s, p in zip(seeds, positions)]
    noise = seeded_exponential([5, 5, 6], [0, 1, 0], 50, torch.device("cpu"))
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.equal(noise[0], seeded_exponential([5], [0], 50, torch.device("cpu"))[0])


def test_seeded_noise_is_exponential_and_seeded_sampling_follows_the_distribution():
    """The hash's E values have Exp(1)'s mean, spread and tail, across seeds, positions and tokens;
    seeded draws (a seed per row, or one seed over many positions) follow p like unseeded ones."""
    from batchllm.layers.seeded_noise import seeded_exponential

    noise = seeded_exponential(list(range(200)), [3 * i for i in range(200)], 5000, torch.device("cpu"))
    assert abs(noise.mean().item() - 1) < 0.01 and abs(noise.std().item() - 1) < 0.01
    assert abs((noise > 3).float().mean().item() - math.exp(-3)) < 0.002  # P(E > 3) = e^-3
    n = 20000
    logits = logits_row()[None, :].repeat(n, 1)
    for seeds, positions in (([*range(n)], [0] * n), ([42] * n, [*range(n)])):
        tokens = torch.tensor(_sample(logits, [spec(seed=s) for s in seeds], positions, torch.Generator())[0])
        freq = torch.bincount(tokens, minlength=5)[:5].float() / n
        assert torch.allclose(freq, torch.tensor(PROBS), atol=0.02), freq


def tempered(temperature: float) -> torch.Tensor:
    """PROBS at a temperature, as the test states it: p ** (1 / T), renormalised."""
    p = torch.tensor(PROBS) ** (1 / temperature)
    return p / p.sum()


def test_temperature_sharpens_and_flattens_the_distribution():
    for temperature in (0.5, 2.0):
        p = processed_probs(logits_row()[None, :], [spec(temperature=temperature)])[0]
        assert torch.allclose(p[:5], tempered(temperature), atol=1e-6), (temperature, p)
    # the filters see the tempered distribution (vLLM: temperature first, then min_p, top-k and top-p)
    assert support(top_p=0.6) == {0, 1} and support(top_p=0.6, temperature=2.0) == {0, 1, 2}
    assert support(min_p=0.6) == {0, 1} and support(min_p=0.6, temperature=2.0) == {0, 1, 2}


def test_drawn_tokens_follow_the_tempered_distribution_seeded_or_not():
    n = 20000
    logits = logits_row()[None, :].repeat(n, 1)
    for temperature in (0.5, 2.0):
        for specs, positions in (([spec(temperature=temperature)] * n, None),
                                 ([spec(temperature=temperature, seed=s) for s in range(n)], [0] * n)):
            tokens = torch.tensor(_sample(logits, specs, positions, torch.Generator().manual_seed(3))[0])
            freq = torch.bincount(tokens, minlength=5)[:5].float() / n
            assert torch.allclose(freq, tempered(temperature), atol=0.02), (temperature, freq)


def raw_logprobs_check(lp, sampled_token: int) -> None:
    """The row's logprobs are of PROBS, untouched by its temperature, filters, bans and adjustments (vLLM's
    default, logprobs_mode "raw_logprobs")."""
    assert lp.top_token_ids == [0, 1]
    assert math.isclose(lp.top_logprobs[0], math.log(0.4), rel_tol=1e-5)
    assert math.isclose(lp.top_logprobs[1], math.log(0.3), rel_tol=1e-5)
    assert math.isclose(lp.sampled_logprob, math.log(PROBS[sampled_token]), rel_tol=1e-5)
    assert lp.sampled_rank == sampled_token + 1


def test_logprobs_are_of_the_raw_distribution_with_rank():
    logits = logits_row()[None, :]
    tokens, lps = _sample(logits, [spec(temperature=0.0, num_logprobs=2)], None, torch.Generator())
    assert tokens == [0]
    raw_logprobs_check(lps[0], 0)


def test_logprobs_stay_raw_under_sampling_settings_bans_and_adjustments():
    from batchllm.layers.logits_processors import OutputHistory
    from batchllm.outputs import LogitsAdjust

    rows = [
        spec(temperature=0.5, top_k=2, num_logprobs=2, seed=1),
        spec(temperature=2.0, top_p=0.5, min_p=0.2, num_logprobs=2, seed=2),
        spec(temperature=0.0, num_logprobs=2, banned_token_ids=(0,)),  # min_tokens' ban: the argmax is 1
        spec(temperature=0.0, num_logprobs=2, num_prompt_tokens=3,  # a bias makes 2 the argmax; the penalty
             adjust=LogitsAdjust(logit_bias=((2, 5.0),), frequency_penalty=1.0)),  # lowers 1, an earlier output
    ]
    history = OutputHistory(3)
    history.record(0, [4, 4, 4, 1])
    logits = logits_row()[None, :].repeat(len(rows), 1)
    tokens, lps = _sample(logits, rows, [5, 5, 5, 5], torch.Generator(), [None, None, None, history])
    assert tokens[2:] == [1, 2]
    for token, lp in zip(tokens, lps):
        raw_logprobs_check(lp, token)


def test_a_tied_token_ranks_last_among_its_ties_as_in_vllm():
    """vLLM's rank counts the tokens at least as likely as the chosen one; bfloat16 logits tie often."""
    from batchllm.layers.sampler import rank_among

    logits = torch.tensor([[0.0, 2.0, 2.0, 2.0, 1.0, -1.0]])
    tokens, lps = _sample(logits, [spec(temperature=0.0, num_logprobs=1)], None, torch.Generator())
    assert tokens[0] in (1, 2, 3) and lps[0].sampled_rank == 3
    logprobs = torch.log_softmax(logits, dim=-1)
    assert rank_among(logprobs, logprobs[:, [4]]).tolist() == [4]  # (the prompt logprobs' ranks use it too)
    assert rank_among(logprobs, logprobs[:, [5]]).tolist() == [6]
