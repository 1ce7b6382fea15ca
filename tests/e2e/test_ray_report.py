"""The Ray job's per-replica report from call records (no Ray needed)."""

from __future__ import annotations

from batchllm.ray.report import calls_from_rows, summarize_calls


def _row(replica, call, prompt, prefill, prefix=None, prefix_len=0, error=None):
    return {"batchllm_replica": replica, "batchllm_call": call, "num_input_tokens": prompt, "error": error,
            "batchllm_prefill_tokens": prefill, "batchllm_shared_prefix": prefix,
            "batchllm_shared_prefix_len": prefix_len}


def test_report_counts_savings_per_replica_and_prefixes_computed_twice():
    rows = [
        _row("A", "a1", 100, 100, "P", 80), _row("A", "a1", 100, 20, "P", 80),   # P computed once in a1
        _row("A", "a2", 100, 100, "P", 80),                                        # and again in a2 (same replica)
        _row("B", "b1", 100, 100, "P", 80), _row("B", "b1", 50, 10, "Q", 30),     # and on replica B
        _row("B", "b1", 0, 0, error="too long"),                                   # errors took no engine work
    ]
    report = summarize_calls(calls_from_rows(rows))
    assert report["num_rows"] == 5 and report["num_calls"] == 3
    assert report["prompt_tokens"] == 450 and report["prefill_tokens"] == 330
    assert report["replicas"]["A"]["num_rows"] == 3 and report["replicas"]["A"]["saving_ratio"] == 1 - 220 / 300
    assert report["duplicate_prefix_tokens_across_calls"] == 2 * 80
    assert report["duplicate_prefix_tokens_across_replicas"] == 80
    assert report["replicas"]["A"]["prefix_tokens_also_on_other_replicas"] == 80
    assert report["replicas"]["B"]["prefix_tokens_also_on_other_replicas"] == 80


def test_rows_without_the_processors_columns_are_refused_not_reported_as_zeros():
    """A postprocess returning only its own columns dropped the bookkeeping: the report was all zeros."""
    import pytest

    with pytest.raises(ValueError, match="the rows carry no batchllm_call column: a postprocess"):
        calls_from_rows([{"answer": "Paris"}, {"answer": "Rome"}])
    assert calls_from_rows([]) == [], "no rows: nothing to report, and nothing wrong"
    assert calls_from_rows([_row("A", None, 0, 0, error="too long")]) == [], "only failed rows"


def test_a_dataset_without_the_processors_columns_is_refused_by_name():
    """replica_report on a Dataset selected columns a projecting postprocess had dropped (Ray's own error)."""
    import types

    import pytest

    from batchllm.ray.processor import replica_report

    dataset = types.SimpleNamespace(schema=lambda: types.SimpleNamespace(names=["answer"]),
                                    select_columns=lambda columns: pytest.fail("no column to select"))
    with pytest.raises(ValueError, match="the rows carry no batchllm_call column"):
        replica_report(dataset)
