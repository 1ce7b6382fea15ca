"""BatchLLM: offline, throughput-first LLM batch inference.

    from batchllm import LLM, SamplingParams
    llm = LLM()  # the embedded SmolLM2-135M-Instruct
    outputs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
"""

from batchllm.llm import LLM
from batchllm.request_output import CompletionOutput, Logprob, RequestOutput
from batchllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
