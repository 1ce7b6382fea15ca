"""Helpers ported vLLM scripts import from `vllm.utils` (its older home of FlexibleArgumentParser)."""

from batchllm.utils.argparse_utils import FlexibleArgumentParser

__all__ = ["FlexibleArgumentParser"]
