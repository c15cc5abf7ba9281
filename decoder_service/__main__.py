"""`python -m decoder_service [flags]` is `sharedllm serve decoder [flags]`."""

import sys

from common.cli import main

sys.exit(main(["serve", "decoder", *sys.argv[1:]]))
