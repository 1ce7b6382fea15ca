"""Step markers: the kind of a step, and which kernels of a profile's stream belong to which kind."""

from batchllm.outputs import ScheduledBatch, ScheduledRequest
from batchllm.runner.step_markers import MARKER_KERNELS, kernels_by_step_kind, step_kind


def _request(n_tokens: int, start: int) -> ScheduledRequest:
    return ScheduledRequest(f"r{start}-{n_tokens}", list(range(n_tokens)), start, [], 0, None)


def test_a_step_is_decode_only_when_every_request_computes_one_token():
    assert step_kind(ScheduledBatch([_request(1, 40), _request(1, 7)])) == "decode"
    assert step_kind(ScheduledBatch([_request(1, 40), _request(12, 0)])) == "prefill"  # mixed
    assert step_kind(ScheduledBatch([_request(12, 0)])) == "prefill"


def test_kernels_belong_to_the_step_of_the_last_marker_before_them_in_device_order():
    decode, prefill = MARKER_KERNELS["decode"], MARKER_KERNELS["prefill"]
    kernels = [  # (name, start, duration): listed out of order, as a profile's events may be
        ("attention", 25.0, 4.0), (prefill, 10.0, 1.0), ("matmul", 11.0, 9.0), ("norm", 5.0, 1.0),
        (decode, 30.0, 1.0), ("matmul", 31.0, 2.0), ("attention", 33.0, 1.5), (prefill, 40.0, 1.0),
        ("matmul", 41.0, 7.0),
    ]
    assert kernels_by_step_kind(kernels) == {  # "norm" ran before any marker: no step's
        "prefill": [("matmul", 9.0), ("attention", 4.0), ("matmul", 7.0)],
        "decode": [("matmul", 2.0), ("attention", 1.5)],
    }
