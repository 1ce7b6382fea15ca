"""vLLM's `vllm.logprobs`, as its scripts import it (`from vllm.logprobs import Logprob`): the same `Logprob` as
`batchllm.Logprob`, and vLLM's names for a position's and a sequence's logprobs (as lists: vLLM's flat form is not
made here)."""

from batchllm.request_output import Logprob

LogprobsOnePosition = dict[int, Logprob]
PromptLogprobs = list[LogprobsOnePosition | None]
"""`RequestOutput.prompt_logprobs`: None for the first prompt token, then one position's logprobs per token."""
SampleLogprobs = list[LogprobsOnePosition]
"""`CompletionOutput.logprobs`: one position's logprobs per generated token."""

__all__ = ["Logprob", "LogprobsOnePosition", "PromptLogprobs", "SampleLogprobs"]
