"""`python -m sharedllm` is `sharedllm` (for torchrun, and where the script is not on PATH)."""

import sys

from sharedllm.cli import main

sys.exit(main())
