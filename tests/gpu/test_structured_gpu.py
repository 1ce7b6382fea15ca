"""Structured output, allowed_token_ids, logit_bias and structured beam search on the GPU (CUDA graphs, asynchronous
steps and the Triton kernels, as a user gets them): the greedy tokens of the same requests on the CPU (float32 both).
A structural tag's too. No other GPU test runs a grammar: the runner's masks were checked on the CPU alone.

Needs a tokenizer: $BATCHLLM_TEST_TOKENIZER_DIR (a directory of tokenizer files, e.g. the default model's, carried to
the device: scripts/gpu_check.sh says how), else the default model converted from its GGUF (the `gguf` package)."""

from __future__ import annotations

import json
import os

import pytest

from batchllm import LLM, SamplingParams
from batchllm.sampling_params import BeamSearchParams
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.gpu

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 6},
                                           "score": {"type": "integer"}}, "required": ["answer", "score"]}
TAG = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<f="], "at_least_one": True,
                                            "tags": [{"begin": "<f=x>", "end": "</f>", "content": {
                                                "type": "json_schema", "json_schema": SCHEMA}}]}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("xgrammar")
    tokenizer_dir = os.environ.get("BATCHLLM_TEST_TOKENIZER_DIR")
    if not tokenizer_dir:
        pytest.importorskip("gguf")
        from batchllm.models.default_model import default_model_dir

        tokenizer_dir = str(default_model_dir())
    return str(make_tiny_model("llama", tmp_path_factory.mktemp("llama"), tokenizer_dir=tokenizer_dir))


def _requests():
    prompts = [{"prompt_token_ids": list(range(10, 10 + n))} for n in (5, 40, 130, 7, 7, 64, 9)]
    params = [SamplingParams(temperature=0, max_tokens=12, structured_outputs={"choice": ["yes", "no", "maybe so"]}),
              SamplingParams(temperature=0, max_tokens=12, structured_outputs={"regex": "[a-z]{2,8}@[0-9]{3}"}),
              SamplingParams(temperature=0, max_tokens=40, structured_outputs={"json": SCHEMA}),
              SamplingParams(temperature=0, max_tokens=10, allowed_token_ids=[100, 200, 300, 400], ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, logit_bias={500: 30.0, 600: 29.0}, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, structured_outputs={"structural_tag": json.dumps(TAG)})]
    return prompts, params


def _generate(model_dir: str, device: str):
    llm = LLM(model_dir, device=device, dtype="float32", max_model_len=256, max_num_batched_tokens=64,
              **({"kv_cache_memory_gib": 1} if device == "cuda" else {"num_kv_blocks": 64}))
    try:
        prompts, params = _requests()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        beams = llm.beam_search(prompts[:2], BeamSearchParams(beam_width=3, max_tokens=6,
                                                              structured_outputs={"choice": ["yes", "no", "maybe"]}))
        return outputs, beams, llm.tokenizer
    finally:
        llm.shutdown()


def test_masked_and_structured_rows_give_the_cpus_tokens(model_dir):
    got, got_beams, tokenizer = _generate(model_dir, "cuda")
    expected, expected_beams, _ = _generate(model_dir, "cpu")
    assert [list(o.outputs[0].token_ids) for o in got] == [list(o.outputs[0].token_ids) for o in expected]
    assert [[s.tokens for s in b.sequences] for b in got_beams] == [[s.tokens for s in b.sequences]
                                                                    for b in expected_beams]
    choice, regex, schema, allowed, biased, _, tagged = (o.outputs[0] for o in got)
    assert tagged.text.startswith("<f=x>"), tagged.text  # (the tag must come: at_least_one)
    assert choice.text in ("yes", "no", "maybe so") and choice.finish_reason == "stop"
    assert regex.finish_reason == "length" or "@" in regex.text
    if schema.finish_reason == "stop":
        assert schema.text.startswith("{"), [(o.outputs[0].text, o.outputs[0].token_ids) for o in got]
        answer = json.loads(schema.text)
        assert isinstance(answer["score"], int) and len(answer["answer"]) <= 6
    assert set(allowed.token_ids) <= {100, 200, 300, 400}
    assert set(biased.token_ids) <= {500, 600}
    finished = [s for beam in got_beams for s in beam.sequences if s.tokens[-1] == tokenizer.eos_token_id]
    assert all(tokenizer.decode(s.tokens[len(s.orig_prompt["prompt_token_ids"]):-1]) in ("yes", "no", "maybe")
               for s in finished)
