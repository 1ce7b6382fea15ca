"""Torch-free prefix planning over the whole batch: radix tree and the sharing plans."""

from batchllm.prefix.plan import MULTI_LEVEL, PLAN_MODES, SINGLE_LEVEL, PrefixGroup, PrefixPlan, plan_prefix_sharing
from batchllm.prefix.radix import RadixTree, build_radix_tree

__all__ = [
    "MULTI_LEVEL", "PLAN_MODES", "SINGLE_LEVEL", "PrefixGroup", "PrefixPlan", "RadixTree",
    "build_radix_tree", "plan_prefix_sharing",
]
