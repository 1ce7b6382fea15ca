"""`build_processor(config, preprocess=..., postprocess=...)`: BatchLLM as a Ray Data stage.

    processor = build_processor(ProcessorConfig(num_replicas=4, num_gpus_per_replica=1),
                                preprocess=lambda row: {"messages": row["messages"]})
    out = processor(ray.data.read_parquet(...))     # lazy Dataset -> lazy Dataset

The processor is three public Ray Data operations: `map_batches` (CPU tasks: preprocess, chat
template, tokens, prefix key, bucket), `groupby(bucket)` (a hash shuffle that brings every row of a
bucket, hence every row of a prefix key, together) and `map_groups` over an actor pool of
`num_replicas` engines (one call per bucket: the engine plans prefix sharing over all of it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from batchllm.ray.config import ProcessorConfig
from batchllm.ray.report import calls_from_rows, summarize_calls
from batchllm.ray.stages import BUCKET, EngineReplica, tokenize_batch

logger = logging.getLogger(__name__)


class Processor:
    """A callable `Dataset -> Dataset`; nothing runs until the returned dataset is consumed."""

    def __init__(self, config: ProcessorConfig, preprocess: Callable | None = None,
                 postprocess: Callable | None = None, *, record_fn: Callable | None = None,
                 index_column: str | None = None, on_loaded: Callable[[], None] | None = None) -> None:
        self.config = config
        self.preprocess = preprocess
        self.postprocess = postprocess
        self.record_fn = record_fn
        self.index_column = index_column
        self.on_loaded = on_loaded  # (each replica calls it once its engine is built: `EngineReplica`)

    def num_buckets(self, dataset, num_rows: int | None = None) -> int:
        """0 where the rows were counted (or given) and there are none; else config.num_buckets, else
        max(num_replicas, ceil(rows / batch_size)) (rows counted unless given). With config.num_buckets and no
        `num_rows`, a dataset that turns out empty still meets Ray's shuffle failure (`__call__`)."""
        config = self.config
        if num_rows == 0:
            return 0
        if config.num_buckets is not None:
            return config.num_buckets
        rows = dataset.count() if num_rows is None else num_rows
        return max(config.num_replicas, math.ceil(rows / config.batch_size)) if rows else 0

    def __call__(self, dataset, num_rows: int | None = None):
        """The dataset's rows answered (lazily, as Ray's operations are). A dataset known to be empty (counted,
        or `num_rows` 0) comes back empty: Ray's shuffle fails on blocks that no batch function has seen
        ("Invalid sort key column")."""
        import ray

        config = self.config
        num_buckets = self.num_buckets(dataset, num_rows)
        if num_buckets == 0:
            return dataset.limit(0)
        tokenized = dataset.map_batches(
            tokenize_batch, batch_size=config.tokenize_batch_size, batch_format="pyarrow", zero_copy_batch=True,
            fn_kwargs=dict(config=config, preprocess=self.preprocess, num_buckets=num_buckets,
                           index_column=self.index_column),
        )
        return tokenized.groupby(BUCKET, num_partitions=num_buckets).map_groups(
            EngineReplica, batch_format="pyarrow",
            fn_constructor_kwargs=dict(config=config, postprocess=self.postprocess, record_fn=self.record_fn,
                                       on_loaded=self.on_loaded),
            compute=ray.data.ActorPoolStrategy(size=config.num_replicas),
            num_gpus=self._num_gpus(), num_cpus=self._num_cpus(),
            max_restarts=-1, max_task_retries=-1,  # a replica that dies is restarted and its call retried
        )

    def _num_cpus(self) -> float:
        """The replicas' CPU request, cut so that the CPUs the other stages hold stay free: the
        engine actors start with the job and keep their CPUs, so the read and tokenize tasks (one
        CPU) and, with checkpointing, Ray's checkpoint filter actor (one CPU) would otherwise never
        get one and the job would never start (e.g. 2 replicas on 2 CPUs)."""
        import ray

        config = self.config
        wanted = config.num_cpus_per_replica
        reserved = 1 + (ray.data.DataContext.get_current().checkpoint_config is not None)
        free = ray.cluster_resources().get("CPU", 0) - reserved
        if wanted * config.num_replicas <= free:
            return wanted
        fitted = max(free, 0) / config.num_replicas
        logger.warning("%d replicas x %g CPUs would leave no CPU for the other stages; asking %.2f CPUs each",
                       config.num_replicas, wanted, fitted)
        return fitted

    def _num_gpus(self) -> float:
        config = self.config
        if config.num_gpus_per_replica is not None:
            return config.num_gpus_per_replica
        import ray

        options = config.engine_options()  # (engine_kwargs' parallel sizes too, where vLLM's Ray configs give them)
        if options.get("device") == "cpu" or not ray.cluster_resources().get("GPU"):
            return 0
        return options.get("data_parallel_size", 1) * options.get("tensor_parallel_size", 1)


def build_processor(config: ProcessorConfig, preprocess: Callable[[dict], dict] | None = None,
                    postprocess: Callable[[dict], dict] | None = None) -> Processor:
    """The processor for `config`, shaped like `ray.data.llm.build_llm_processor`.

    preprocess(row) -> {"prompt": str} | {"messages": [...]} | {"prompt_token_ids": [...]}, optionally
    with "sampling_params": {...} (over the config's defaults), "prefix_key": any (rows with equal
    keys run in the same engine call) or "error": str (reject the row). Without it the row itself
    must hold these. Output rows: the input columns plus generated_text, generated_token_ids,
    finish_reason, num_input_tokens, num_generated_tokens, error (None, or why the row failed) and
    batchllm_* bookkeeping (replica, call, prefix key, prefill tokens); then postprocess(row) -> row."""
    return Processor(config, preprocess, postprocess)


def replica_report(rows: Iterable[dict] | Any) -> dict:
    """Per replica: rows, prompt tokens, prefill tokens computed, saving ratio and the shared-prefix
    tokens that another replica computed too; for the job: the same totals and the prefix tokens
    computed more than once (across replicas, across calls). `rows`: output rows or a Dataset
    (only the bookkeeping columns are read; ValueError where a postprocess dropped them)."""
    if hasattr(rows, "select_columns"):
        from batchllm.ray.report import NO_BOOKKEEPING
        from batchllm.ray.stages import CALL, ERROR, PREFILL, REPLICA, SHARED_PREFIX, SHARED_PREFIX_LEN

        columns = [REPLICA, CALL, ERROR, PREFILL, SHARED_PREFIX, SHARED_PREFIX_LEN, "num_input_tokens"]
        schema = rows.schema()
        if schema is not None and not set(columns) <= set(schema.names):
            raise ValueError(NO_BOOKKEEPING)
        rows = rows.select_columns(columns).iter_rows()
    return summarize_calls(calls_from_rows(rows))
