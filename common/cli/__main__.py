"""`python -m common.cli` is `sharedllm` (used by tests and where the script is not on PATH)."""

import sys

from common.cli import main

sys.exit(main())
