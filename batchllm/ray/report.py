"""Per-replica prefix-sharing report of a Ray job, from per-call records. Imports neither ray nor torch.

A call record: {"replica", "call", "num_rows", "prompt_tokens", "prefill_tokens",
"prefixes": {digest of a top-level shared prefix: its length in tokens}}. A shared prefix whose digest
appears in several calls was computed once per call: the extra computations are what bucketing by
prefix key is meant to avoid.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from batchllm.ray.stages import CALL, ERROR, PREFILL, REPLICA, SHARED_PREFIX, SHARED_PREFIX_LEN

NO_BOOKKEEPING = (f"the rows carry no {CALL} column: a postprocess that returns only some columns drops the "
                  f"processor's bookkeeping ({CALL}, {REPLICA}, {PREFILL}, {SHARED_PREFIX}, {SHARED_PREFIX_LEN}, "
                  "num_input_tokens); keep them in its rows to report")
"""Why a report of rows without the processor's columns would be all zeros."""


def calls_from_rows(rows: Iterable[dict]) -> list[dict]:
    """Call records from the processor's output rows (rows with an error took no engine work); ValueError
    (NO_BOOKKEEPING) where rows came but none has the processor's columns."""
    calls: dict[str, dict] = {}
    seen = kept = False
    for row in rows:
        seen, kept = True, kept or CALL in row
        if row.get(ERROR) or row.get(CALL) is None:
            continue
        call = calls.setdefault(row[CALL], {"replica": row[REPLICA], "call": row[CALL], "num_rows": 0,
                                            "prompt_tokens": 0, "prefill_tokens": 0, "prefixes": {}})
        call["num_rows"] += 1
        call["prompt_tokens"] += row["num_input_tokens"]
        call["prefill_tokens"] += row[PREFILL]
        if row.get(SHARED_PREFIX):
            call["prefixes"][row[SHARED_PREFIX]] = row[SHARED_PREFIX_LEN]
    if seen and not kept:
        raise ValueError(NO_BOOKKEEPING)
    return list(calls.values())


def summarize_calls(calls: list[dict]) -> dict:
    """Totals per replica and for the job, with the prefix tokens computed more than once."""
    replicas: dict[str, dict] = {}
    prefix_len: dict[str, int] = {}
    calls_of: dict[str, int] = defaultdict(int)
    replicas_of: dict[str, set[str]] = defaultdict(set)
    for call in calls:
        r = replicas.setdefault(call["replica"],
                                {"num_calls": 0, "num_rows": 0, "prompt_tokens": 0, "prefill_tokens": 0})
        r["num_calls"] += 1
        for name in ("num_rows", "prompt_tokens", "prefill_tokens"):
            r[name] += call[name]
        for digest, length in call["prefixes"].items():
            prefix_len[digest] = length
            calls_of[digest] += 1
            replicas_of[digest].add(call["replica"])
    for name, r in replicas.items():
        r["saving_ratio"] = _saving(r)
        r["prefix_tokens_also_on_other_replicas"] = sum(
            prefix_len[d] for d, owners in replicas_of.items() if name in owners and len(owners) > 1)
    totals = {k: sum(r[k] for r in replicas.values()) for k in ("num_rows", "prompt_tokens", "prefill_tokens")}
    return {
        **totals,
        "saving_ratio": _saving(totals),
        "num_calls": len(calls),
        "duplicate_prefix_tokens_across_replicas": sum(prefix_len[d] * (len(o) - 1) for d, o in replicas_of.items()),
        "duplicate_prefix_tokens_across_calls": sum(prefix_len[d] * (n - 1) for d, n in calls_of.items()),
        "replicas": replicas,
    }


def _saving(counts: dict) -> float:
    return 1.0 - counts["prefill_tokens"] / counts["prompt_tokens"] if counts["prompt_tokens"] else 0.0
