"""`python -m compressor_service [flags]` is `sharedllm serve compressor [flags]`."""

import sys

from common.cli import main

sys.exit(main(["serve", "compressor", *sys.argv[1:]]))
