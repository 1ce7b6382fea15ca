"""FP8 on the GPU: torch._scaled_mm (row-wise) against the CPU path's math and against bf16 on the
Llama-3.1-8B linear shapes, and the engine with quantization='fp8' against bf16 on a small dummy Llama.

    python -m pytest -q tests/gpu/test_fp8_gpu.py          (on the device; needs compute capability >= 8.9)
"""

import json

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.layers.fp8 import fp8_matmul, quantize_rows, scaled_mm_supported

pytestmark = pytest.mark.gpu

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@pytest.fixture(autouse=True)
def _needs_fp8():
    if not scaled_mm_supported(torch.device("cuda")):
        pytest.skip("FP8 tensor cores need compute capability >= 8.9")


@pytest.mark.parametrize("m", [1, 7, 16, 300])
@pytest.mark.parametrize("layer", list(SHAPES))
def test_scaled_mm_is_the_emulated_math_and_close_to_bf16(layer, m):
    n, k = SHAPES[layer]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    wq, ws = quantize_rows(w)
    fast = fp8_matmul(x, wq, ws.view(n), use_scaled_mm=True)
    emulated = fp8_matmul(x, wq, ws.view(n), use_scaled_mm=False)
    assert fast.dtype == torch.bfloat16 and fast.shape == (m, n)
    # the same quantized operands, float32 accumulation both ways: bf16 output rounding apart
    torch.testing.assert_close(fast.float(), emulated.float(), rtol=1.6e-2,
                               atol=1e-2 * emulated.float().abs().max().item())
    ref = (x.float() @ w.float().t())
    rel = float((fast.float() - ref).norm() / ref.norm())
    assert rel < 0.05, f"{layer} M={m}: FP8 is {rel:.4f} (relative L2) from the float32 product"  # ~0.03 expected


def _dummy_llama(tmp_path):
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=1024,
                  intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                  max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
                  tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def _greedy_on_dummy(model_dir, max_tokens: int, **kw):
    """(the LLM, its greedy tokens for 16 prompts of 21-96 tokens) with dummy bf16 weights on CUDA."""
    prompts = [{"prompt_token_ids": [1] + [(7 * i + 13 * j) % 31000 + 3 for j in range(20 + 5 * i)]} for i in range(16)]
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm = LLM(model_dir, load_format="dummy", device="cuda", dtype="bfloat16", skip_tokenizer_init=True,
              kv_cache_memory_gib=1, **kw)
    return llm, [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


def test_engine_fp8_on_a_dummy_llama_mostly_agrees_with_bf16(tmp_path):
    model_dir = _dummy_llama(tmp_path)

    def run(**kw):
        return _greedy_on_dummy(model_dir, 8, **kw)

    fp8_llm, fp8 = run(quantization="fp8")
    layer = fp8_llm.engine.model.model.layers[0].mlp.gate_up_proj
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.use_scaled_mm
    _, bf16 = run()
    first = sum(a[0] == b[0] for a, b in zip(fp8, bf16)) / len(fp8)
    tokens = sum(x == y for a, b in zip(fp8, bf16) for x, y in zip(a, b)) / sum(map(len, fp8))
    print(f"FP8 vs bf16, dummy Llama: {first:.2f} first tokens, {tokens:.2f} of all tokens at the same place")
    # random weights give flat logits (std ~0.6 over 32,000 tokens: top-2 gaps ~0.1), so FP8's few
    # percent of error flips some argmaxes; a broken FP8 path agrees on ~none
    assert first >= 0.5


@pytest.mark.parametrize("k", [64, 4096, 14336])
def test_triton_quantizer_matches_the_torch_form(k):
    from batchllm.layers.fp8_triton import quantize_rows_triton

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(333, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 3
    x[5] = 0  # an all-zero row: the floor scale, zeros out
    x[7, 3] = 1e4  # an outlier sets its row's scale
    q_ref, s_ref = quantize_rows(x)
    q, s = quantize_rows_triton(x)
    # both take IEEE steps (amax / 448, 1 / scale, the product): the same bits
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(q[5].float(), torch.zeros(k, device="cuda"))


def test_torch_quantizer_is_captured_by_a_cuda_graph():
    """`quantize_rows` is the engine's quantizer where Triton's is not used (GPUs without FP8 tensor
    cores emulate the matmul but still capture decode graphs): it copies nothing from the host, so a
    graph captures it, and the replay gives the eager bits."""
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16) * 3
    q_eager, s_eager = quantize_rows(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_graph, s_graph = quantize_rows(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(s_graph, s_eager)
    assert torch.equal(q_graph.view(torch.uint8), q_eager.view(torch.uint8))


def test_a_checkpoint_with_unquantized_layers_and_an_fp8_cache_runs_the_same_with_graphs(tmp_path):
    """A compressed-tensors config leaving layers out (ignore) and declaring an FP8 KV cache (kv_cache_scheme):
    the left-out layers run in bf16 beside the FP8 ones (fused input quantization and deferred scales around
    them), the cache is FP8, and decode steps replayed from CUDA graphs give the eager steps' tokens."""
    model_dir = _dummy_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "ignore": ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj",
                   *(f"model.layers.2.self_attn.{p}_proj" for p in "qkv")],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True}}},
        "kv_cache_scheme": {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False,
                            "symmetric": True}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    graphs, with_graphs = _greedy_on_dummy(model_dir, 12)
    layers = graphs.engine.model.model.layers
    assert layers[0].mlp.down_proj.weight.dtype == torch.bfloat16 and layers[2].self_attn.qkv_proj.weight.dtype \
        == torch.bfloat16 and layers[1].self_attn.o_proj.weight.dtype == torch.bfloat16
    assert layers[0].mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    assert graphs.engine.kv_spec.dtype == torch.float8_e4m3fn
    _, eager = _greedy_on_dummy(model_dir, 12, enforce_eager=True)
    assert with_graphs == eager
