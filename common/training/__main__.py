"""`python -m common.training train ...`: the `train` command alone.

It needs only what training needs (torch, transformers, numpy, safetensors, tqdm, and gguf
to convert the default model): no gRPC, Redis or telemetry packages, which an accelerator
machine without network access may lack (see scripts/device_train.py).
"""

import argparse
import sys

from common.cli import main
from common.training.cli import add_train_commands


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m common.training")
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    return parser


sys.exit(main(build=train_parser))
