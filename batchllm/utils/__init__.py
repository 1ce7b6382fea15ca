"""Helpers ported vLLM scripts import from `vllm.utils` (the older home of FlexibleArgumentParser and
get_open_port)."""

from batchllm.utils.argparse_utils import FlexibleArgumentParser
from batchllm.utils.network_utils import get_open_port

__all__ = ["FlexibleArgumentParser", "get_open_port"]
