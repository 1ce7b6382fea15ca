"""BatchLLM as a Ray Data stage (`pip install batchllm[ray]`); nothing of batchllm's core imports it.

    import ray
    from batchllm.ray import ProcessorConfig, build_processor
    processor = build_processor(ProcessorConfig(num_replicas=2, max_tokens=64),
                                preprocess=lambda row: {"messages": [{"role": "user", "content": row["q"]}]})
    ds = processor(ray.data.read_json("questions.jsonl"))

This package is named `batchllm.ray`; its modules import the real `ray` lazily, inside functions, and
use absolute imports only. See README "Running on a cluster".
"""

from __future__ import annotations

from batchllm.ray.config import ProcessorConfig
from batchllm.ray.processor import Processor, build_processor, replica_report

__all__ = ["ProcessorConfig", "Processor", "build_processor", "replica_report"]
