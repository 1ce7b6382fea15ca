"""What `LLM.generate` returns: vLLM-shaped `RequestOutput` / `CompletionOutput` / `Logprob`."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field


@dataclass
class Logprob:
    """vLLM's Logprob: its three fields, and no others (`dataclasses.fields`, `asdict` and `repr` show only
    them, so `json.dumps(dataclasses.asdict(lp))` works as with vLLM's)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None

    token_bytes = None  # (no annotation: an attribute, not a dataclass field)
    """bytes | None: the bytes the token stands for, set with `decoded_token` on the instance (None: not
    decoded). A token that holds part of a character (byte-level BPE splits emoji and CJK characters) decodes
    alone to U+FFFD, so its `decoded_token` says nothing of it; these bytes are what OpenAI's logprobs `bytes`
    report. Not a field: bytes are not JSON, and vLLM's Logprob has no such field."""


@dataclass
class CompletionOutput:
    """vLLM 0.26's CompletionOutput: its fields, in its order (code that builds outputs positionally, a mock or a
    cache of results, reads as with vLLM's)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    routed_experts: None = None
    """vLLM's field for MoE routing records: always None (not recorded here)."""
    finish_reason: str | None = None
    """'stop' or 'length' (or 'abort'; 'error', vLLM's for a request that failed: see `error`); None: unfinished."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended generation; None for EOS or length."""
    lora_request: None = None
    """vLLM's field: always None (no LoRA adapters here)."""

    error = None  # (no annotation: an attribute, not a dataclass field, as Logprob.token_bytes)
    """str | None: why a completion whose finish_reason is 'error' failed (a structured-output grammar that no
    string completes), set on the instance; None otherwise. `run` writes such a line as an error record."""

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """vLLM 0.26's RequestOutput: its fields, in its order (request_id, prompt, prompt_token_ids, prompt_logprobs,
    outputs, finished, metrics, lora_request, encoder_prompt, encoder_prompt_token_ids, num_cached_tokens,
    num_cache_creation_tokens; then, by keyword only, kv_transfer_params and ec_transfer_params), so code that
    builds one positionally reads as with vLLM's; `outputs` before `prompt_logprobs` had put a mock's completions
    in its prompt logprobs."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    """With SamplingParams.prompt_logprobs = k (vLLM's shape): None for the first prompt token, then
    per prompt token {token_id: Logprob} holding that token (its rank in the distribution) and the
    top k (ranks 1..k); None when not asked for."""
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    metrics: None = None
    """vLLM's per-request timing (None there too unless stats are logged): None; `LLM.last_stats` has the call's."""
    lora_request: None = None
    encoder_prompt: None = None
    encoder_prompt_token_ids: None = None
    """vLLM's fields for what is not supported here (LoRA, encoder-decoder models): always None."""
    num_cached_tokens: int | None = None
    """Prompt tokens whose KV was read from a shared prefix instead of computed for this request, as vLLM's
    prefix-cache hits: a shared prefix is charged to the first request of the call that reads it (0 there)
    and counted here for the others; 0 without sharing. So over a call of n = 1 prompts, the sum of
    len(prompt_token_ids) - num_cached_tokens is the prefill computed. With n > 1 the first completion's."""
    num_cache_creation_tokens: int | None = None
    """vLLM's count of prompt tokens written to its prefix cache: None (not counted here)."""
    _: KW_ONLY
    kv_transfer_params: None = None
    ec_transfer_params: None = None
    """vLLM's fields for KV and encoder-cache transfer (not supported here): always None."""

    @property
    def num_output_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


def output_error(output: RequestOutput) -> str | None:
    """Why a prompt's output failed: its first failed completion's `CompletionOutput.error` (with n > 1, "completion
    k: ..."); None where none failed. A batch writes such a prompt as a failed line, not as an answer."""
    for completion in output.outputs:
        if completion.finish_reason == "error":
            error = completion.error or "the request failed"
            return error if len(output.outputs) == 1 else f"completion {completion.index}: {error}"
    return None
