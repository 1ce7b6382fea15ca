"""vLLM's `vllm.entrypoints` module paths that batch scripts run (`python -m vllm.entrypoints.openai.run_batch`)."""
