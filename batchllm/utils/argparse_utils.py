"""vLLM's `FlexibleArgumentParser`, as its example scripts import it (`from vllm.utils.argparse_utils import
FlexibleArgumentParser`, then `EngineArgs.add_cli_args(parser)`): a ported script changes its imports only."""

from __future__ import annotations

import argparse
import sys

from batchllm.options import bare_flags_as_on, dashed_flag_names


class FlexibleArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that reads its flags as vLLM's does: a flag's name may be spelled with underscores
    (`--max_model_len 4k`), and an optional on/off engine flag given bare (`--async-scheduling`) is on. vLLM's
    `--config` YAML files and its `--json-arg.key` dotted spellings are not read."""

    def parse_known_args(self, args=None, namespace=None):
        words = list(sys.argv[1:] if args is None else args)
        flags = [flag for action in self._actions for flag in action.option_strings if flag.startswith("--")]
        return super().parse_known_args(bare_flags_as_on(dashed_flag_names(words), flags), namespace)
