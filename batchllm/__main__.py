"""`python -m batchllm ...`: the `batchllm` command."""

import sys

from batchllm.cli import main

sys.exit(main())
