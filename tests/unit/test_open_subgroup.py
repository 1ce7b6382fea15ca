"""`MemoryAdmission.can_open_subgroup` sums the open work's group blocks without walking every running request
(`open_blocks`): the same sum, the same admissions, far fewer `group_blocks` walks."""

from __future__ import annotations

import random
from itertools import chain

import pytest

from batchllm.core.policies import MemoryAdmission
from batchllm.core.scheduler import Scheduler
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
    """The open work's blocks, summed once per admission loop and kept as it admits (`Scheduler._admit_from`),
    equal the whole sum over the running requests and READY prefixes at every nested prefix that asks; the steps
    are those of the old sum taken afresh for each."""
    rng = random.Random(seed)
    prompts = nested_prompts(rng)
    kwargs = dict(num_blocks=rng.choice([10, 11, 12, 14]), max_tokens=rng.randrange(3, 9),
                  budget=rng.choice([16, 32, 64]), threshold=rng.choice([1.0, 2.0]))
    schedulers, compared = {}, []
    real_init, real_can = Scheduler.__init__, MemoryAdmission.can_open_subgroup

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        schedulers[id(self.admission)] = self

    def checked(self, prefix, open_blocks, nothing_running):
        sched = schedulers[id(self)]
        whole = old_open_blocks(self, chain(sched.running, sched.ready_prefixes))
        kept = lambda: compared.append((open_blocks(), whole)) or compared[-1][0]  # noqa: E731
        return real_can(self, prefix, kept, nothing_running)

    monkeypatch.setattr(Scheduler, "__init__", init)
    monkeypatch.setattr(MemoryAdmission, "can_open_subgroup", checked)
    out, sched, executor, _ = run(prompts, sharing=True, **kwargs)
    batches = [[(r.request_id, r.start_position, len(r.token_ids)) for r in b.requests] for b in executor.batches]
    assert all(kept == whole for kept, whole in compared), compared
    monkeypatch.setattr(MemoryAdmission, "can_open_subgroup", lambda self, prefix, open_blocks, nothing_running: (
        nothing_running or self.projected_blocks <= self.capacity
        or old_open_blocks(self, chain(schedulers[id(self)].running, schedulers[id(self)].ready_prefixes))
        + self.group_blocks(prefix) <= self.capacity))
    old_out, old_sched, old_executor, _ = run(prompts, sharing=True, **kwargs)
    assert out == old_out
    assert batches == [[(r.request_id, r.start_position, len(r.token_ids)) for r in b.requests]
                       for b in old_executor.batches], "the same steps"
    assert sched.stats == old_sched.stats
    assert compared, "the group outgrew the pool: can_open_subgroup summed the open work"


def test_open_work_is_summed_once_per_admission_loop(monkeypatch):
    """Regression (a 100k-line job over a 0.5 GiB cache: 10,010 sums in 1,015 steps, each a pass over every
    running request, 23 s of a 105-s run): the sum is taken at most once per `_admit_from` call, however many
    nested prefixes that loop opens; and `open_blocks` walks only the entries with members not started."""
    rng = random.Random(1)
    sums, asks, loops = [], [], []
    real_open, real_can, real_admit = (MemoryAdmission.open_blocks, MemoryAdmission.can_open_subgroup,
                                       Scheduler._admit_from)
    walks = []
    real_group = MemoryAdmission.group_blocks

    def open_blocks(self, open_work):
        open_work = list(open_work)
        before = len(walks)
        total = real_open(self, open_work)
        sums.append((loops[-1], len(walks) - before, sum(1 for r in open_work if r.pending_members)))
        return total

    def admit_from(self, *args):
        loops.append(len(loops))
        return real_admit(self, *args)

    def can(self, prefix, open_blocks, nothing_running):
        asks.append(loops[-1])
        return real_can(self, prefix, open_blocks, nothing_running)

    monkeypatch.setattr(MemoryAdmission, "open_blocks", open_blocks)
    monkeypatch.setattr(MemoryAdmission, "can_open_subgroup", can)
    monkeypatch.setattr(Scheduler, "_admit_from", admit_from)
    monkeypatch.setattr(MemoryAdmission, "group_blocks", lambda self, r: walks.append(r) or real_group(self, r))
    prompts = nested_prompts(rng) + [[rng.randrange(500, 900) for _ in range(3)] for _ in range(40)]
    run(prompts, sharing=True, num_blocks=40, max_tokens=6, budget=64, threshold=1.0)
    assert sums, "the open work was summed"
    summed_in = [loop for loop, _, _ in sums]
    assert len(summed_in) == len(set(summed_in)), "one sum per admission loop"
    assert len(asks) > len(sums), "some loop asked twice and summed once"
    assert all(walked <= with_pending for _, walked, with_pending in sums), sums


def test_an_overcommitted_pool_full_of_ready_prefixes_still_finishes():
    """Above a threshold of 1, nested groups opened together filled a small pool with READY prefixes whose members
    could not start; they were released and reopened the same way forever (a livelock the review fuzzer found).
    After a release, admission charges the pool itself until a request finishes: the batch ends, with the tokens of
    a threshold of 1."""
    rng = random.Random(16)
    prompts = [[rng.choice([1, 2]) for _ in range(rng.randrange(2, 22))] for _ in range(rng.randrange(20, 60))]
    max_tokens = [rng.randrange(1, 10) for _ in prompts]
    loose, sched, _, _ = run(prompts, sharing=True, num_blocks=8, block_size=10, budget=256, max_tokens=max_tokens,
                             threshold=4.0)
    assert sched.stats.num_prefix_releases > 0
    assert loose == run(prompts, sharing=True, num_blocks=8, block_size=10, budget=256, max_tokens=max_tokens)[0]
