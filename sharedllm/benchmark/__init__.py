"""`sharedllm bench`: SharedLLM against full attention and StreamingLLM, speed and memory.

Each (method, length, repetition) cell runs in its own process (`python -m sharedllm.benchmark.cell`)
so that peak memory is the cell's own; the runner alternates cells, and the report gives
medians and same-run ratios, because absolute seconds on a shared machine are not stable.
"""
