"""`bench.linear_flops`, the matmul part of issue 14's compute limit, against the weights of the same
architecture as transformers builds it (on the meta device: shapes only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from batchllm.bench import linear_flops
from batchllm.models.spec import read_model_spec
from tests.helpers import TINY_CONFIGS, VOCAB, keys_attended

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"


def _linear_weights(model_dir: Path) -> tuple[int, int]:
    """(elements of every nn.Linear weight but the LM head, elements of the LM head's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in linear if m is not head), head.weight.numel()


def _write_config(name: str, out_dir: Path) -> Path:
    kwargs = dict(TINY_CONFIGS[name])
    kwargs.update(vocab_size=VOCAB, architectures=[{"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[name]])
    (out_dir / "config.json").write_text(json.dumps(kwargs))
    return out_dir


@pytest.mark.parametrize("source", ["llama-3.1-8b", "llama-3.2-1b", "qwen3-tiny"])
def test_linear_flops_count_every_projection_and_the_lm_head_once(source, tmp_path):
    """Two FLOPs per weight per computed token for the decoder's linear layers (q/k/v/o, gate/up/down,
    every layer; qwen3: a head dim other than hidden / heads), two per LM-head weight per sampled token;
    the Llama-3.1-8B shape: 6.98e9 linear weights, as published (8.03e9 less two 128,256 x 4,096
    embeddings and the norms)."""
    model_dir = _write_config("qwen3", tmp_path) if source == "qwen3-tiny" else CONFIGS / source
    spec = read_model_spec(model_dir)
    linear, head = _linear_weights(model_dir)
    assert linear_flops(spec, 1, 0) == 2 * linear
    assert linear_flops(spec, 0, 1) == 2 * head
    assert linear_flops(spec, 300, 7) == 2 * (300 * linear + 7 * head)
    if source == "llama-3.1-8b":
        assert linear == 6_979_321_856


@pytest.mark.parametrize("shared, degree, requests, sharing, limit", [
    (2000, 16, 1024, True, 121), (2000, 4, 1024, True, 66), (16000, 16, 256, True, 31), (2000, 16, 1024, False, 23),
])
def test_compute_limit_gives_issue_14s_numbers(shared, degree, requests, sharing, limit):
    """The Llama-3.1-8B shape at 780 TFLOP/s on the issue's workloads (200 distinct prompt tokens, 100 output
    tokens each): what the scheduler would count for a run with perfect sharing (each group's prefix computed
    once) or none gives the compute limits issue 14's table states (121, 66, 31 and 23 req/s)."""
    from batchllm.bench import _compute_limit

    spec = read_model_spec(CONFIGS / "llama-3.1-8b")
    own, out, groups = 200, 100, requests // degree
    if sharing:
        prefill = groups * shared + requests * own
        keys = groups * keys_attended(0, shared) + requests * keys_attended(shared, shared + own + out - 1)
    else:
        prefill = requests * (shared + own)
        keys = requests * keys_attended(0, shared + own + out - 1)
    stats = dict(prefill_tokens_computed=prefill, decode_tokens=requests * (out - 1), attended_keys=keys,
                 num_requests=requests)
    got = _compute_limit(spec, stats, requests * out, 780.0, wall_s=2.0)
    assert round(got["compute_limit_requests_per_s"]) == limit
    assert got["compute_limit_share"] == pytest.approx(requests / got["compute_limit_requests_per_s"] / 2.0)
