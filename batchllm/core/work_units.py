"""Turn a `PrefixPlan` and the batch's requests into scheduler input: shared-prefix nodes linked to
their members, top-level units ordered by a `GroupOrder` policy. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable

from batchllm.core.policies import GroupOrder, WorkUnit
from batchllm.prefix.plan import PrefixPlan
from batchllm.request import Request
from batchllm.sampling_params import SamplingParams

_PREFIX_PARAMS = SamplingParams(max_tokens=1)  # prefixes do not sample: only prompt_logprobs is read


def _prefix_params(k: int | None, cache: dict[int | None, SamplingParams]) -> SamplingParams:
    """A prefix node's params: prompt_logprobs = the largest asked by a request under it (None: no
    request under it asks, and the prefix computes no logits; `core/prompt_logprobs.py`)."""
    if k is None:
        return _PREFIX_PARAMS
    if k not in cache:
        cache[k] = SamplingParams(max_tokens=1, prompt_logprobs=k)
    return cache[k]


def build_submission(plan: PrefixPlan, requests: list[Request], order: GroupOrder,
                     expected_output: Callable[[Request], int], id_prefix: str) -> list[Request]:
    """Return every request and prefix node in submission order (parents before members).

    `requests[i]` is prompt i of the plan; this sets its `parent` to the node of its group."""
    nodes: dict[int, Request] = {}
    params_cache: dict[int | None, SamplingParams] = {}
    any_prompt_logprobs = any(r.sampling_params.prompt_logprobs is not None for r in requests)

    def node_for(group_id: int) -> Request:
        if group_id not in nodes:
            group = plan.groups[group_id]
            parent = node_for(group.parent) if group.parent is not None else None
            under = plan.prompts_under(group_id)
            some_member = requests[under[0]]
            asked = [k for p in under if (k := requests[p].sampling_params.prompt_logprobs) is not None] \
                if any_prompt_logprobs else []
            nodes[group_id] = Request(
                request_id=f"{id_prefix}g{group_id}",
                prompt_token_ids=some_member.prompt_token_ids[: group.prefix_len],
                sampling_params=_prefix_params(max(asked, default=None), params_cache),
                arrival_index=some_member.arrival_index,
                parent=parent,
                is_prefix=True,
            )
        return nodes[group_id]

    for group in plan.groups:
        node = node_for(group.group_id)
        for p in group.prompts:
            requests[p].parent = node

    units: list[tuple[tuple, list[Request]]] = []
    for group in plan.top_level_groups:
        members = _subtree(plan, group.group_id, nodes, requests)
        units.append((order.sort_key(_summarise(members, expected_output)), members))
    for p in plan.ungrouped:
        units.append((order.sort_key(_summarise([requests[p]], expected_output)), [requests[p]]))
    units.sort(key=lambda unit: unit[0])
    return [r for _, members in units for r in members]


def _subtree(plan: PrefixPlan, group_id: int, nodes: dict[int, Request], requests: list[Request]) -> list[Request]:
    """The group's node, its members and nested groups, parents first, members by arrival."""
    group = plan.groups[group_id]
    out = [nodes[group_id]]
    out.extend(sorted((requests[p] for p in group.prompts), key=lambda r: r.arrival_index))
    for child in group.children:
        out.extend(_subtree(plan, child, nodes, requests))
    return out


def _summarise(members: list[Request], expected_output: Callable[[Request], int]) -> WorkUnit:
    prefill = sum(r.num_prompt_tokens - r.fork_point for r in members)
    real = [r for r in members if not r.is_prefix]
    return WorkUnit(first_arrival=min(r.arrival_index for r in members), prefill_tokens=prefill,
                    expected_decode_tokens=sum(expected_output(r) for r in real))
