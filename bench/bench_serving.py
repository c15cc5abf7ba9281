"""The serving benchmark as a script: `python bench/bench_serving.py [flags]` runs `sharedllm bench [flags]`.

It sits beside the kernel benchmark for whoever looks in bench/ first; the implementation lives
in common/benchmark, where it is importable and tested. See `sharedllm bench --help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sharedllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
