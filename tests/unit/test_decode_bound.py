"""benchmarks/decode_bound.py's arithmetic (issue 14's "show the arithmetic"): a hand-checked case."""

from pathlib import Path

import pytest

from tests.helpers import benchmark_module


def test_bounds_add_prefill_matmuls_and_kv_reads_step_by_step():
    """Two requests of one group (shared prefix 4 tokens, 2 own tokens each), outputs 1 and 2 tokens;
    10 parameters, 100 weight bytes, 1 KV byte per token, peak 20 flop/s, bandwidth 50 B/s.
    Prefill: 2*10*(4 + 2 + 2)/20 = 8 s. Step 1: 2 running, compute 2*10*2/20 = 2 s against weights
    100/50 = 2 s; KV read (2+1) + (2+1) own + 4 shared = 10 B -> 0.2 s. Step 2: 1 running, compute 1 s
    against 2 s; KV (2+2) + 4 = 8 B -> 0.16 s. Sequential: 8 + 2.2 + 2.16 = 12.36; overlapped:
    8 + max(2, 110/50) + max(1, 108/50) = 8 + 2.2 + 2.16 (memory-bound both steps) = 12.36."""
    m = benchmark_module("decode_bound")
    prompts = [[1, 2, 3, 4, 10, 11], [1, 2, 3, 4, 20, 21]]
    b = m.decode_bounds(prompts, [1, 2], shared=4, params=10, weight_bytes=100, kv_bytes_per_token=1,
                        peak=20, bandwidth=50)
    assert b["prefill_s"] == pytest.approx(8.0)
    assert b["sequential_s"] == pytest.approx(12.36)
    assert b["overlapped_s"] == pytest.approx(12.36)
    # compute-bound steps: the overlapped bound drops the KV read the sequential one adds
    b = m.decode_bounds(prompts, [1, 2], shared=4, params=10, weight_bytes=1, kv_bytes_per_token=1, peak=20,
                        bandwidth=50)
    assert b["overlapped_s"] == pytest.approx(8 + 2 + 1)
    assert b["sequential_s"] == pytest.approx(8 + 2.2 + 1.16)


def test_parameter_count_of_the_8b_shape_is_llama_3_1_8b():
    from batchllm.models.spec import read_model_spec

    spec = read_model_spec(Path(__file__).resolve().parents[2] / "benchmarks" / "configs" / "llama-3.1-8b")
    # Llama-3.1-8B has 8,030,261,248 parameters; 266,240 of them are norm weights (65 x 4,096), not counted
    assert benchmark_module("decode_bound").parameter_count(spec) == 8_030_261_248 - 65 * 4096
