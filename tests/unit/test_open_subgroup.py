"""`MemoryAdmission.can_open_subgroup` sums the open work's group blocks without walking every running request
(`open_blocks`): the same sum, the same admissions, far fewer `group_blocks` walks."""

from __future__ import annotations

import random

import pytest

from batchllm.core import policies
from batchllm.core.policies import MemoryAdmission
from tests.unit.test_prefix_scheduling import run


def old_open_blocks(admission, open_work):
    """The sum before: `group_blocks` of every entry."""
    return sum(map(admission.group_blocks, open_work))


def nested_prompts(rng):
    base = [rng.randrange(1, 50) for _ in range(rng.randrange(4, 14))]
    prompts = []
    for j in range(rng.randrange(4, 12)):
        nested = base + [100 + 3 * j + k for k in range(rng.randrange(1, 7))]
        prompts += [nested + [300 + rng.randrange(400) for _ in range(rng.randrange(1, 4))]
                    for _ in range(rng.randint(1, 3))]
    prompts += [[rng.randrange(500, 900) for _ in range(rng.randrange(2, 9))] for _ in range(rng.randrange(0, 6))]
    rng.shuffle(prompts)
    return prompts


@pytest.mark.parametrize("seed", range(30))
def test_open_blocks_equals_the_old_sum_and_admits_the_same(seed, monkeypatch):
    rng = random.Random(seed)
    prompts = nested_prompts(rng)
    kwargs = dict(num_blocks=rng.choice([10, 11, 12, 14]), max_tokens=rng.randrange(3, 9),
                  budget=rng.choice([16, 32, 64]), threshold=rng.choice([1.0, 2.0]))
    compared = []
    real = MemoryAdmission.open_blocks

    def checked(self, open_work):
        open_work = list(open_work)
        new = real(self, open_work)
        assert new == old_open_blocks(self, open_work)
        compared.append(new)
        return new

    monkeypatch.setattr(MemoryAdmission, "open_blocks", checked)
    out, sched, executor, _ = run(prompts, sharing=True, **kwargs)
    batches = [[(r.request_id, r.start_position, len(r.token_ids)) for r in b.requests] for b in executor.batches]
    monkeypatch.setattr(MemoryAdmission, "open_blocks", old_open_blocks)
    old_out, old_sched, old_executor, _ = run(prompts, sharing=True, **kwargs)
    assert out == old_out
    assert batches == [[(r.request_id, r.start_position, len(r.token_ids)) for r in b.requests]
                       for b in old_executor.batches], "the same steps"
    assert sched.stats == old_sched.stats
    assert compared, "the group outgrew the pool: can_open_subgroup summed the open work"


def test_open_blocks_walks_only_the_entries_with_members_not_started(monkeypatch):
    """Regression (885,504 `group_blocks` walks, 6.7 s, at 50k lines): one walk per running request, every step a
    nested group waited. Running members are their own charge."""
    rng = random.Random(1)
    walks = []
    real = MemoryAdmission.group_blocks
    monkeypatch.setattr(MemoryAdmission, "group_blocks", lambda self, r: walks.append(r) or real(self, r))
    sums = []
    real_can = MemoryAdmission.can_open_subgroup

    def can(self, prefix, open_work, nothing_running):
        open_work = list(open_work)
        before = len(walks)
        decision = real_can(self, prefix, open_work, nothing_running)
        if len(walks) > before:
            sums.append((len(walks) - before, sum(1 for r in open_work if r.pending_members) + 1, len(open_work)))
        return decision

    monkeypatch.setattr(policies.MemoryAdmission, "can_open_subgroup", can)
    prompts = nested_prompts(rng) + [[rng.randrange(500, 900) for _ in range(3)] for _ in range(40)]
    run(prompts, sharing=True, num_blocks=40, max_tokens=6, budget=64, threshold=1.0)
    assert sums, "the open work was summed"
    assert all(walked <= with_pending for walked, with_pending, _ in sums), sums
    assert any(walked < size for walked, _, size in sums), "running members were not walked"
