"""The serving benchmark as a script: `python bench/bench_serving.py [flags]` runs `sharedllm bench [flags]`.

It sits beside the kernel benchmark for whoever looks in bench/ first; the implementation lives
in sharedllm/benchmark, where it is importable and tested. See `sharedllm bench --help`.
"""

import sys

from sharedllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
