"""vLLM's `FlexibleArgumentParser`, as its example scripts import it (`from vllm.utils.argparse_utils import
FlexibleArgumentParser`, then `EngineArgs.add_cli_args(parser)`): a ported script changes its imports only."""

from __future__ import annotations

import argparse
import sys

from batchllm.config_file import ConfigFileError, with_config_file
from batchllm.options import bare_flags_as_on, dashed_flag_names


class FlexibleArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that reads its flags as vLLM's does: a flag's name may be spelled with underscores
    (`--max_model_len 4k`), an optional on/off engine flag given bare (`--async-scheduling`) is on, and
    `--config FILE.yaml` reads options from a file, as vLLM's (`batchllm.config_file`; unless the parser has a
    `--config` of its own). vLLM's `--json-arg.key` dotted spellings are not read."""

    def parse_known_args(self, args=None, namespace=None):
        words = dashed_flag_names(list(sys.argv[1:] if args is None else args))
        actions = {flag: action for action in self._actions for flag in action.option_strings}
        if "--config" not in actions:
            try:
                words = with_config_file(words, lambda rest: actions, has_command=False)
            except ConfigFileError as error:
                self.error(str(error))
        flags = [flag for flag in actions if flag.startswith("--")]
        return super().parse_known_args(bare_flags_as_on(words, flags), namespace)
