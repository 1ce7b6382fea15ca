"""vLLM's `vllm.entrypoints.openai`: only its batch runner (`run_batch`); BatchLLM serves no HTTP."""
