"""The --layers mode of bf16_agreement.py: where bfloat16 loses precision, op by op and layer by layer
(CPU; the Triton kernels run in Triton's interpreter, TRITON_INTERPRET=1 set by the caller).

Error unit of the per-op table: the relative L2 error of the float32 result rounded once to
bfloat16, on the same data. An op scoring 1.0 rounds exactly once, at its output; HF's arithmetic
(round after every torch op) scores more.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from batchllm import LLM, SamplingParams
from batchllm.layers.ops import TorchOps
from tests.helpers import interpreter_rounds_to_nearest  # run from the repository root (PYTHONPATH=.)

BF16 = torch.bfloat16


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return float(err.double().norm() / ref.double().norm().clamp_min(1e-30))


class Capture:
    """Forward hooks on one engine's model: the inputs and outputs of every op of one prefill."""

    def __init__(self, model) -> None:
        self.data: dict[str, object] = {}
        self.handles = []
        self.handles.append(model.register_forward_pre_hook(lambda m, a: self._store("forward", a)))
        for i, layer in enumerate(model.model.layers):
            for module, name in ((layer.input_layernorm, "norm1"), (layer.post_attention_layernorm, "norm2"),
                                 (layer.self_attn.qkv_proj, "qkv"), (layer.self_attn, "attn"),
                                 (layer.mlp.gate_up_proj, "gate_up"), (layer.mlp, "mlp")):
                self._watch(module, f"{i}.{name}")
        self._watch(model.model.norm, "final")

    def _watch(self, module, name):
        """Store a module's inputs (before it runs: ops may overwrite their input buffers) and outputs."""
        self.handles.append(module.register_forward_pre_hook(lambda m, args: self._store(name + ".in", args)))
        self.handles.append(module.register_forward_hook(lambda m, args, out: self._store(name, out)))

    def _store(self, name, value):
        if name in self.data:  # only the first forward (the prefill) is kept
            return
        clone = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
        self.data[name] = tuple(clone(v) for v in value) if isinstance(value, tuple) else clone(value)

    def close(self):
        for h in self.handles:
            h.remove()


def run_prefill(llm: LLM, prompts) -> dict:
    """One step's activations: the prefill of all prompts at once (the engine is made without prefix
    sharing, which would prefill a shared prefix in a step of its own)."""
    assert sum(map(len, prompts)) <= llm.config.scheduler.max_num_batched_tokens, "the prompts must fit one step"
    capture = Capture(llm.engine.model)
    try:
        llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=1),
                     use_tqdm=False)
    finally:
        capture.close()
    data = capture.data
    if isinstance(data["final"], tuple):  # the final norm with the last residual add: (norm, sum)
        data["final"] = data["final"][0]
    return data


def _ops_policies() -> dict:
    policies = {"torch": TorchOps()}
    if importlib.util.find_spec("triton") is not None:
        from batchllm.layers.triton_ops import TritonOps

        interpreter_rounds_to_nearest()

        policies["triton"] = TritonOps()
    return policies


def op_errors(ref: dict, model32, policy, num_layers: int) -> dict[str, float]:
    """Each op of `policy` in bfloat16 on the float32 run's activations (rounded to bfloat16) against
    the same op in float32 on the same inputs, in units of one rounding of the output."""
    f32 = TorchOps()
    sums: dict[str, list[float]] = {}

    def add(name, got, want):
        e = sums.setdefault(name, [0.0, 0.0, 0.0])
        e[0] += float((got.double() - want.double()).pow(2).sum())
        e[1] += float((want.to(BF16).double() - want.double()).pow(2).sum())

    table = model32.model.rotary
    positions = ref["forward"][1]
    for i in range(num_layers):
        layer = model32.model.layers[i]
        w1 = layer.input_layernorm.weight.detach().to(BF16)
        w2 = layer.post_attention_layernorm.weight.detach().to(BF16)
        eps = layer.input_layernorm.eps
        x, resid = (t.to(BF16) for t in ref[f"{i}.norm2.in"])
        want_out, want_sum = f32.add_rms_norm(x.float(), resid.float(), w2.float(), eps)
        got_out, got_sum = policy.add_rms_norm(x.clone(), resid.clone(), w2, eps)
        add("add + RMSNorm: output", got_out, want_out)
        add("add + RMSNorm: residual sum", got_sum, want_sum)
        if i == 0:
            emb = ref["0.norm1.in"][0].to(BF16)
            add("RMSNorm (no residual)", policy.rms_norm(emb.clone(), w1, eps),
                f32.rms_norm(emb.float(), w1.float(), eps))
        attn = layer.self_attn
        n = ref[f"{i}.qkv"].shape[0]
        qk = ref[f"{i}.qkv"][:, :attn.q_size + attn.kv_size].to(BF16).view(n, -1, attn.head_dim)
        want = f32.step_rotary(table.cos, table.sin_signed, positions, torch.float32)(qk.float())
        got = policy.step_rotary(table.cos, table.sin_signed, positions, BF16)(qk.clone())
        add("rotary (q, k)", got, want)
        gate_up = ref[f"{i}.gate_up"].to(BF16)
        add("SiLU-and-mul", policy.silu_and_mul(gate_up.clone()), f32.silu_and_mul(gate_up.float()))
    hidden = ref["final"].to(BF16)
    weight = model32.lm_head.weight.detach().to(BF16)
    want = F.linear(hidden.float(), weight.float())
    add("LM head (logits in bf16)", F.linear(hidden, weight), want)
    return {name: round((e[0] / e[1]) ** 0.5, 3) for name, e in sums.items()}


def drift(ref: dict, got: dict, num_layers: int, lm_head_weight: torch.Tensor) -> dict:
    """Relative L2 error of a bfloat16 run's hidden states against the float32 run's, per layer."""
    rows = []
    for i in range(num_layers):
        resid_ref, resid = ref[f"{i}.norm2"][1], got[f"{i}.norm2"][1]
        rows.append({
            "layer": i,
            "residual": _rel(resid.float() - resid_ref, resid_ref),
            "attention": _rel(got[f"{i}.attn"].float() - ref[f"{i}.attn"], ref[f"{i}.attn"]),
            "mlp": _rel(got[f"{i}.mlp"].float() - ref[f"{i}.mlp"], ref[f"{i}.mlp"]),
        })
    final_ref, final = ref["final"], got["final"]
    logits_ref = F.linear(final_ref, lm_head_weight.float())
    logits = F.linear(final, lm_head_weight.to(final.dtype)).float()
    return {
        "layers": rows,
        "final_norm": _rel(final.float() - final_ref, final_ref),
        "logits": _rel(logits - logits_ref, logits_ref),
        "top1_agreement_pct": 100.0 * float((logits.argmax(-1) == logits_ref.argmax(-1)).float().mean()),
        "top1_ties_pct": 100.0 * float((logits == logits.max(-1, keepdim=True).values).sum(-1).gt(1).float().mean()),
    }


def layer_report(model, conversations) -> dict:
    llm32 = LLM(model, dtype="float32", device="cpu", prefix_sharing=False)
    prompts = [llm32.tokenize_prompt(llm32.apply_chat_template(c)).token_ids for c in conversations]
    ref = run_prefill(llm32, prompts)
    num_layers = len(llm32.model.model.layers)
    report = {"prompts": len(prompts), "tokens": int(ref["final"].shape[0]), "ops": {}, "drift": {}}
    llm16 = LLM(model, dtype="bfloat16", device="cpu", kernels="torch", prefix_sharing=False)
    for name, policy in _ops_policies().items():
        report["ops"][name] = op_errors(ref, llm32.model, policy, num_layers)
        llm16.model.use_ops(policy)
        got = run_prefill(llm16, prompts)
        report["drift"][name] = drift(ref, got, num_layers, llm32.model.lm_head.weight.detach())
    _print_tables(report)
    return report


def _print_tables(report: dict) -> None:
    policies = list(report["ops"])
    print("| op (bf16 vs fp32, same inputs) | " + " | ".join(policies) + " |")
    print("| --- |" + " --- |" * len(policies))
    for op in report["ops"][policies[0]]:
        print(f"| {op} | " + " | ".join(f"{report['ops'][p][op]:.2f}" for p in policies) + " |")
    print()
    print("| layer | " + " | ".join(f"{p}: residual / attn / mlp" for p in policies) + " |")
    print("| --- |" + " --- |" * len(policies))
    num_layers = len(report["drift"][policies[0]]["layers"])
    for i in sorted({0, 1, num_layers // 4, num_layers // 2, 3 * num_layers // 4, num_layers - 1}):
        cells = []
        for p in policies:
            r = report["drift"][p]["layers"][i]
            cells.append(f"{r['residual']:.4f} / {r['attention']:.4f} / {r['mlp']:.4f}")
        print(f"| {i} | " + " | ".join(cells) + " |")
    for key in ("final_norm", "logits", "top1_agreement_pct", "top1_ties_pct"):
        print(f"| {key} | " + " | ".join(f"{report['drift'][p][key]:.4f}" for p in policies) + " |")
