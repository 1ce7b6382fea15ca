"""Test helpers: tiny random-weight models built by transformers, and HF greedy decoding as the oracle."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch

VOCAB = 49152  # SmolLM2's tokenizer, so that tiny models take text prompts too

TINY_CONFIGS = {
    "llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    ),
    "mistral": dict(
        model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024, sliding_window=None,
    ),
    "qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    "qwen2-untied": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False,
    ),
    "qwen3": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}


def make_tiny_model(name: str, out_dir: Path, *, tokenizer_dir: Path | None = None, seed: int = 0,
                    **overrides) -> Path:
    """TINY_CONFIGS[name] with random weights (and the tokenizer files of `tokenizer_dir`) saved
    in out_dir; `overrides` replace config fields (max_position_embeddings=2048 ...)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**TINY_CONFIGS[name], **overrides}
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init: peaked logits, few near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer_dir is not None:
        for f in tokenizer_files(tokenizer_dir):
            shutil.copy(f, out_dir / f.name)
    return out_dir


def tokenizer_files(directory: Path) -> list[Path]:
    """The files of `directory` that make its tokenizer as transformers saves one: tokenizer*, chat_template*,
    special_tokens*."""
    return [f for f in Path(directory).iterdir() if f.name.startswith(("tokenizer", "chat_template", "special_tokens"))]


def with_kv_scales(model_dir: Path, k_scale: float, v_scale: float, num_layers: int = 2) -> Path:
    """Give a tiny model's checkpoint per-layer k/v scales, and a quantization_config that loads them: FP8 with
    every linear layer ignored, so the weights stay as they were (as in vLLM, only an FP8 model loads k/v scales;
    FP8 activations would change the tokens). Returns model_dir."""
    import json

    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    linears = [f"model.layers.{i}.{m}" for i in range(num_layers) for m in ("self_attn.q_proj", "self_attn.k_proj",
               "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": linears}
    (model_dir / "config.json").write_text(json.dumps(config))
    save_file({f"model.layers.{i}.self_attn.{n}": torch.tensor(s) for i in range(num_layers) for n, s in
               (("k_scale", k_scale), ("v_scale", v_scale))}, str(model_dir / "kv-scales.safetensors"))
    return model_dir


def keys_attended(first: int, end: int) -> int:
    """Keys read by the tokens at positions first .. end - 1, each its position + 1 (causal attention:
    what `SchedulerStats.attended_keys` adds up)."""
    return (end * (end + 1) - first * (first + 1)) // 2


def hf_greedy(
    model_dir: str | Path, prompts: list[list[int]], max_new_tokens: int, *, stop_at_eos: bool = True
) -> list[list[int]]:
    """HF transformers greedy continuation of each prompt, run one prompt at a time (no padding).
    With stop_at_eos the output ends with the model's EOS token if it produced one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if not stop_at_eos:
        model.generation_config.eos_token_id = None
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
            )
            outputs.append(out[0, len(ids):].tolist())
    return outputs


def interpreter_rounds_to_nearest() -> None:
    """Make Triton's interpreter round float32 -> bfloat16 to nearest, as the GPU does (it truncates
    by default, which makes a kernel's bf16 results look several roundings off). Idempotent."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.cast_impl
    if getattr(cast, "rounds_to_nearest", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16).numpy()
            return interpreter.TensorHandle(rounded.view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    cast_impl.rounds_to_nearest = True
    interpreter.InterpreterBuilder.cast_impl = cast_impl


def benchmark_module(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def patch_interpreter_rounding() -> None:
    """Make the Triton interpreter round as the GPU does (and torch): to nearest, ties to even, in
    its casts to float8_e4m3fn and from float32 to bfloat16. Triton 3.9's interpreter drops the
    carry when a value rounds up into e4m3's next binade (1.97 becomes 1.0, not 2.0: ~3% of random
    values), so an in-kernel cast to e4m3 (the FP8 attention's query and softmax weights) would be
    tested against a wrong number; and it truncates float32 to bfloat16 (half of random values one
    unit low), where a kernel's bits are compared with torch's (deferred FP8 scales). Other
    conversions, and GPU runs, are untouched."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._convert_float
    if getattr(original, "patched_e4m3", False):
        return

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if output_dtype == tl.float8e4nv and input_dtype in (tl.float32, tl.float16, tl.bfloat16):
            if input_dtype == tl.bfloat16:  # stored as uint16 bits
                values = (input.astype(np.uint32) << 16).view(np.float32)
            else:
                values = input.view(np.float32 if input_dtype == tl.float32 else np.float16).astype(np.float32)
            e4m3 = torch.from_numpy(np.ascontiguousarray(values)).to(torch.float8_e4m3fn)
            return e4m3.view(torch.uint8).numpy().reshape(input.shape)
        if output_dtype == tl.bfloat16 and input_dtype == tl.float32 and rounding_mode is None:  # a plain cast
            bf16 = torch.from_numpy(np.ascontiguousarray(input).view(np.float32)).to(torch.bfloat16)
            return bf16.view(torch.int16).numpy().view(np.uint16).reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    convert.patched_e4m3 = True
    interpreter._convert_float = convert


def assert_ops_scale_on_load(ops, norm_input, residual, weight, gate_up, qkv, rotary, rotated_heads: int,
                             head_dim: int) -> torch.Tensor:
    """Deferred FP8 scales (`layers/fp8.py`): `ops` (TritonOps, on CPU interpreted) given `Fp8Output`s give
    the bits they give on the outputs those stand for (`scaled()`): add-and-RMSNorm of norm_input with
    residual and weight, plain and quantized; SiLU-and-mul of gate_up, plain and quantized; and
    `rotary.scale_and_rotate` of qkv (the first rotated_heads heads rotated by `rotary`, the others only
    scaled). Returns the scaled and rotated qkv."""
    from batchllm.layers.fp8 import Fp8Input

    def fresh(out):  # the kernels write into the product's buffer
        return out._replace(product=out.product.clone())

    def same(got, want):
        if isinstance(want, Fp8Input):
            assert torch.equal(got.scale, want.scale) and torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))
        else:
            assert torch.equal(got, want)

    for quantize in (False, True):
        got, summed = ops.add_rms_norm(fresh(norm_input), residual.clone(), weight, 1e-5, quantize)
        want, want_sum = ops.add_rms_norm(norm_input.scaled(), residual.clone(), weight, 1e-5, quantize)
        assert torch.equal(summed, want_sum)
        same(got, want)
        same(ops.silu_and_mul(fresh(gate_up), quantize), ops.silu_and_mul(gate_up.scaled(), quantize))
    got = rotary.scale_and_rotate(fresh(qkv), rotated_heads, head_dim)
    plain = qkv.scaled()
    want = plain.clone()
    n = want.shape[0]
    rotary(want[:, :rotated_heads * head_dim].view(n, rotated_heads, head_dim))
    assert torch.equal(got, want)
    assert torch.equal(got[:, rotated_heads * head_dim:], plain[:, rotated_heads * head_dim:]), "v scaled only"
    return got


def greedy_agreement(got, want) -> tuple[float, float]:
    """Two runs' greedy outputs (CompletionOutputs with logprobs, prompt by prompt): (share of outputs identical,
    share of positions equal up to and including each prompt's first difference, after which the contexts differ).
    Asserts that at every first difference each side's token is among the other's top logprobs."""
    identical = matched = compared = 0
    for a, b in zip(got, want):
        identical += a.token_ids == b.token_ids
        for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
            compared += 1
            if ta != tb:
                assert ta in b.logprobs[i] and tb in a.logprobs[i], f"position {i}: {ta} vs {tb} not in the top"
                break
            matched += 1
    return identical / len(want), matched / compared


_GGUF_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(model_dir: Path, path: Path, architecture: str, *, rope_freqs=None, metadata=None,
               experts: int = 0, tokenizer: bool = True) -> Path:
    """A tiny Hugging Face model directory written as an F32 GGUF file as llama.cpp writes one: its shape as
    `<architecture>.*` keys, the embedded default model's tokenizer fields, llama's q/k rows permuted to GGML's rope
    layout, `rope_freqs` (one divisor per rotary frequency) as a rope_freqs.weight tensor, `metadata` as
    {key: (value, GGUFValueType)}, and with `experts` > 0 each MLP weight stacked that many times as
    ffn_*_exps tensors (a mixture-of-experts file); without `tokenizer`, no tokenizer fields (a file only its
    metadata is read from)."""
    import json

    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from safetensors.torch import load_file

    from batchllm.models.default_model import find_gguf

    config = json.loads((model_dir / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    heads, kv_heads, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    writer = GGUFWriter(str(path), architecture)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(1)
    for key, (value, kind) in (metadata or {}).items():
        writer.add_key_value(key, value, kind)
    for key, field in GGUFReader(str(find_gguf())).fields.items() if tokenizer else ():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, field.contents(), field.types[0],
                                 sub_type=field.types[1] if field.types[0] == GGUFValueType.ARRAY else None)
    weights = load_file(str(model_dir / "model.safetensors"))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for layer in range(config["num_hidden_layers"]):
        names.update({f"model.layers.{layer}.{ours}": f"blk.{layer}.{theirs}"
                      for ours, theirs in _GGUF_LAYER_TENSORS.items()})
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    for name, tensor in weights.items():
        array = tensor.float().numpy()
        if architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            rows = heads if name.endswith("q_proj.weight") else kv_heads
            array = array.reshape(rows, 2, array.shape[0] // rows // 2, -1).swapaxes(1, 2).reshape(array.shape)
        gguf_name = names[name]
        if experts and gguf_name.split(".")[-2] in ("ffn_gate", "ffn_up", "ffn_down"):
            gguf_name = gguf_name.replace(".weight", "_exps.weight")
            array = np.stack([array] * experts)
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama3_rope_divisors(model_dir: Path) -> list[float]:
    """The per-frequency divisors of the llama3 rope scaling of `model_dir`'s config, as transformers computes its
    scaled frequencies: theta ** (-2i / head_dim) over transformers' scaled frequency i."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(str(model_dir))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plain = config.rope_parameters["rope_theta"] ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (plain / scaled.double()).tolist()


def interrupted_call_case(model_dir, device: str, where: str, at: int, monkeypatch) -> None:
    """Ctrl-C in the `at`-th call of the runner's `where`: "wait", the host waiting on a step's tokens with the next
    step already queued behind it, or "submit", the host queueing a step; asynchronous steps, a pool too small for
    the whole batch. The next call on the same `LLM` generates what a fresh engine generates (fp32: the same
    tokens), and the interrupted one leaves nothing pending or queued. (Before session 60, the interrupted step's
    tokens stayed counted as pending, and a later call on a small pool could stop with "scheduler produced an empty
    step with work pending".)"""
    from batchllm import LLM, SamplingParams
    from batchllm.runner.model_runner import ModelRunner, PendingRunnerOutput

    shared = list(range(10, 310))
    prompts = [{"prompt_token_ids": shared + [100 + i] * (i + 1)} for i in range(6)]
    prompts += [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 90)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    def engine():  # 40 blocks of 16: the 6 sharing members and the rest cannot all run at once
        return LLM(model_dir, device=device, dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=64,
                   block_size=16, num_kv_blocks=40, async_scheduling=True)

    fresh = engine()
    expected = [o.outputs[0].token_ids for o in fresh.generate(prompts, params, use_tqdm=False)]
    fresh.shutdown()
    llm = engine()
    calls = [0]
    owner, name = (PendingRunnerOutput, "result") if where == "wait" else (ModelRunner, "submit")
    original = getattr(owner, name)

    def interrupted(self, *args):
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return original(self, *args)

    try:
        monkeypatch.setattr(owner, name, interrupted)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, params, use_tqdm=False)
        monkeypatch.setattr(owner, name, original)
        scheduler = llm.engine.core.scheduler
        assert scheduler.num_pending_outputs == 0 and not scheduler.running and not scheduler.waiting
        again = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == expected
    finally:
        llm.shutdown()


def within(seconds: float, call):
    """`call()`'s result, run in a daemon thread; an AssertionError where it has not returned within `seconds` (a
    hang is then the test's failure, not the suite's)."""
    import threading

    results = []
    thread = threading.Thread(target=lambda: results.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return results[0]
