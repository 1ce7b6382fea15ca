"""The activation reserve of an automatically sized KV cache, measured rather than guessed.

The KV cache takes what gpu_memory_utilization of the card leaves once the weights are loaded, less a reserve for
what the largest step allocates and frees (`model_runner.kv_cache_budget`). A fixed tenth of the card was too much
on a large card (on an H100 an 8B model's steps peaked 1.8-4 GiB over the cache, against a reserve of 7.9 GiB) and
could be too little on a small one, since a step's activations grow with its token budget, not with the card.

`measure_activation_reserve` measures it as vLLM does: it runs one step of the token budget through the model
(every layer's linear layers, norms, rotation and MLP; `NoAttention` stands for the attention, whose own output
is an allocation of the same shape) and the LM head and the sampler over one slice of the step's sampling rows
(`sampler.row_slices`: a step's logits never take more), with sampling settings that take the sampler's widest
path, then the prompt logprobs over one slice of rows, and reads torch's peak. To that it adds what the measured
step cannot show: the attention's partial buffers (`attention_workspace_bytes`), the step's block table and the
decode graphs' memory pool, captured after the cache is allocated. Block copies, which come before a step's
forward, go BLOCK_COPY_BYTES at a time.
Every byte of a step is torch's, so a card's (1 - gpu_memory_utilization) is left for the allocator's cached
blocks, as in vLLM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from batchllm.attention.triton_backend import STAGE_MAX_BYTES
from batchllm.attention.work_items import TARGET_PROGRAMS
from batchllm.layers.prompt_logprobs import compute_prompt_logprobs
from batchllm.layers.sampler import row_slices, sample_on_device
from batchllm.models.decoder import DecoderForCausalLM
from batchllm.outputs import PromptLogprobsSpec, SamplingSpec, ScheduledRequest

logger = logging.getLogger(__name__)

PARTIAL_ROWS_PER_TOKEN = 3
"""Partial outputs one query token may need in a step (`work_items.plan_work_items`): one from its own tile or
suffix item, one from each prefix group's item over it (two levels of nested groups)."""
SPLIT_ROWS = 256
"""Partial rows one extra split-K piece adds at most: the query rows of the widest prefill tile."""

BLOCK_COPY_BYTES = 256 * 2**20
"""The most bytes of KV blocks one copy-on-write copies at once (`ModelRunner._copy_blocks`, whose gather of the
sources is a temporary of that size), before the step's forward: the reserve holds at least this much."""


class NoAttention:
    """An attention backend that stores and reads nothing and returns zeros of attention's output shape (the same
    allocation as attention's own output; zeros, not `empty`, so that the probe's hidden states are finite whatever
    the allocator hands back): the forward of `step_peak_bytes` runs with it, to measure everything else a step
    holds."""

    supports_decode_graphs = False

    def warmup(self, *args, **kwargs) -> None:
        pass

    def forward(self, query, key, value, kv_cache, metadata, scale, kv_scale=None) -> torch.Tensor:
        return torch.zeros_like(query)


def widest_sampling_specs(max_logprobs: int, rows: int) -> list[SamplingSpec]:
    """Sampling settings for `rows` rows that take the sampler's widest path: one greedy row beside drawn ones (the
    drawn rows are then copied out of the logits before they are processed), seeded and unseeded draws, top-k,
    top-p, min-p, and logprobs on every row. (On the 8B shape, 523 rows drawn with top-p and logprobs peaked 0.3 GiB
    above a third of them greedy: docs/benchmarks.md, session 47.)"""
    logprobs = max(1, max_logprobs)
    greedy = SamplingSpec(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, num_logprobs=logprobs)
    drawn = [SamplingSpec(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, seed=seed, num_logprobs=logprobs)
             for seed in (1, None)]
    return [greedy] + [drawn[i % 2] for i in range(rows - 1)]


def probe_forward(model: DecoderForCausalLM, tokens: int) -> torch.Tensor:
    """The hidden states [tokens, hidden] of a forward of `tokens` tokens with `NoAttention`: every layer's
    tensors but the attention's own, with no KV cache, under inference mode (as the runner's steps)."""
    device = next(model.parameters()).device
    positions = torch.arange(tokens, device=device) % model.model.rotary.cos.shape[0]
    input_ids = torch.zeros(tokens, dtype=torch.int64, device=device)
    with torch.inference_mode():
        return model(input_ids, positions, [None] * len(model.model.layers), None, NoAttention())


def probe_sampling(model: DecoderForCausalLM, hidden: torch.Tensor, sampling_rows: int, max_logprobs: int, *,
                   driver: bool = True) -> torch.Tensor | None:
    """The runner's sampling of a step's first `sampling_rows` rows, over their first slice only
    (`sampler.row_slices`: the slices after it take no more): the gather of the rows, the LM head and, on the
    driver, the sampler with `widest_sampling_specs`. The slice's tokens; None off the driver."""
    rows = min(sampling_rows, hidden.shape[0])
    picked = hidden[torch.arange(rows, device=hidden.device)]  # (the runner's gather of the sampling rows)
    _, end = row_slices(rows, model.full_spec.vocab_size)[0]
    logits = model.compute_logits(picked[:end])
    if not driver:
        return None
    generator = torch.Generator(device=hidden.device).manual_seed(0)
    return sample_on_device(logits, widest_sampling_specs(max_logprobs, end), list(range(end)), generator).tokens


def probe_prompt_logprobs(model: DecoderForCausalLM, hidden: torch.Tensor, max_logprobs: int, *,
                          driver: bool = True) -> None:
    """The runner's prompt logprobs over one slice of a step's rows (`layers/prompt_logprobs.py` takes as many
    rows as `sampler.row_slices` allows, whatever max_num_seqs): the LM head, fp32 log-softmax and top
    `max_logprobs`, one target per row."""
    vocab = model.full_spec.vocab_size
    _, end = row_slices(hidden.shape[0], vocab)[0]
    spec = PromptLogprobsSpec(num_top=max(1, min(max_logprobs, vocab)), row_start=0, targets=[(0,)] * end)
    request = ScheduledRequest("profile", [0] * end, 0, [], 0, None, prompt_logprobs=spec)
    compute_prompt_logprobs(model.compute_logits, vocab, hidden, [(0, request)], driver=driver)


def step_peak_bytes(model: DecoderForCausalLM, tokens: int, sampling_rows: int, max_logprobs: int, *,
                    driver: bool = True) -> tuple[int, int]:
    """(bytes the step's forward allocated at its peak, bytes the whole step did) beyond what was allocated
    before: `probe_forward`, then `probe_sampling` and `probe_prompt_logprobs` with the hidden states still held,
    as in a step. CUDA only (torch's peak statistics). Under tensor parallelism every rank runs it (the forward
    and the LM head hold collectives); only the driver samples."""
    device = next(model.parameters()).device
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        hidden = probe_forward(model, tokens)
        torch.cuda.synchronize(device)
        forward_peak = torch.cuda.max_memory_allocated(device) - base
        probe_sampling(model, hidden, sampling_rows, max_logprobs, driver=driver)
        probe_prompt_logprobs(model, hidden, max_logprobs, driver=driver)
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del hidden
    torch.cuda.empty_cache()
    return forward_peak, peak


def attention_workspace_bytes(tokens: int, num_heads: int, head_dim: int, num_kv_heads: int) -> int:
    """An upper bound of what the Triton attention allocates in a step of `tokens` tokens beside its output: the
    partial buffers (fp32 outputs and log-sum-exps, `triton_backend.launch_plan`) of PARTIAL_ROWS_PER_TOKEN rows
    per token and SPLIT_ROWS for each extra split-K piece (at most TARGET_PROGRAMS / num_kv_heads + 1 per launch
    split on its own, two launches: `work_items.split_length`), and the staged copy of an fp8 cache's blocks
    (STAGE_MAX_BYTES)."""
    pieces = 2 * (TARGET_PROGRAMS // max(1, num_kv_heads) + 1)
    rows = PARTIAL_ROWS_PER_TOKEN * tokens + SPLIT_ROWS * pieces
    return rows * num_heads * (head_dim + 1) * 4 + STAGE_MAX_BYTES


@dataclass(frozen=True)
class ActivationReserve:
    """What an automatically sized KV cache leaves free for the steps, and its parts (bytes)."""

    step: int  # measured: the step of the token budget, forward, one sampling slice, one prompt-logprob slice
    attention: int  # bounded: the attention's partial buffers
    tables: int  # bounded: the step's block table on the device
    graphs: int  # scaled from the measured forward: the decode graphs' pool

    @property
    def total(self) -> int:
        """The step or a block copy (which comes before the step's forward and is freed by then), the attention's
        buffers, the block table and the graphs' pool."""
        return max(self.step, BLOCK_COPY_BYTES) + self.attention + self.tables + self.graphs

    def describe(self) -> str:
        gib = 2**30
        return (f"{self.total / gib:.2f} GiB (a measured step {self.step / gib:.2f}, attention partials "
                f"{self.attention / gib:.2f}, block tables {self.tables / gib:.2f}, decode graphs "
                f"{self.graphs / gib:.2f})")


def block_table_bytes(sequences: int, max_model_len: int, block_size: int) -> int:
    """An upper bound of a step's block table on the device (`ModelRunner._host_inputs`: int32, one row per
    sequence, as wide as the step's longest table); its per-token slots and positions are small beside it."""
    return sequences * -(-max_model_len // block_size) * 4


def measure_activation_reserve(model: DecoderForCausalLM, tokens: int, sampling_rows: int, max_logprobs: int,
                               graph_batch: int, max_model_len: int, block_size: int, *,
                               driver: bool = True) -> ActivationReserve:
    """The reserve for steps of up to `tokens` tokens and `sampling_rows` sampling rows (sequences), with decode
    graphs of up to `graph_batch` sequences (0: none): `step_peak_bytes`, the attention's partials at `tokens`
    tokens, the block table of that many sequences of up to `max_model_len` tokens in `block_size`-token blocks,
    and the graphs' pool as the measured forward's peak scaled to `graph_batch` tokens (graphs hold a forward's
    tensors, never the sampler's). Running out of memory here is reported naming the settings that size the
    step."""
    try:
        forward, step = step_peak_bytes(model, tokens, sampling_rows, max_logprobs, driver=driver)
    except torch.OutOfMemoryError as error:
        raise torch.OutOfMemoryError(
            f"the GPU ran out of memory running one step of {tokens} tokens and up to {min(tokens, sampling_rows)} "
            "sampling rows before the KV cache was sized (measuring the steps' activation reserve): lower "
            "max_num_batched_tokens, max_num_seqs or max_logprobs, or free the GPU of other processes") from error
    spec = model.spec  # (this rank's heads under tensor parallelism)
    reserve = ActivationReserve(
        step=step, attention=attention_workspace_bytes(tokens, spec.num_heads, spec.head_dim, spec.num_kv_heads),
        tables=block_table_bytes(min(tokens, sampling_rows), max_model_len, block_size),
        graphs=forward * min(graph_batch, tokens) // tokens)
    logger.info("activation reserve for steps of %d tokens: %s", tokens, reserve.describe())
    return reserve
