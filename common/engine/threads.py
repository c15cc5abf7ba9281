"""Which threads of a process run torch's CPU work in parallel.

On Linux, torch parallelises an operation with OpenMP, and every thread that has run a
parallel region keeps its own pool of OpenMP workers for as long as it lives. With two pools
alive on 2 cores there are more OpenMP threads than cores, and a decode step, hundreds of small
operations each a parallel region, gets much slower (the likely cause, not measured here:
libgomp then lets idle workers spin only briefly before they sleep, so each operation pays a
wake-up).
A batching decoder runs nearly all its model work in one thread (the scheduler's), but it
loaded the model in another and plans questions in many more (the gRPC workers). Measured on
2 cores (`python bench/thread_pools.py`, `bench/results/concurrency/thread-pools.json`): a
decode step of 8 rows in the model's thread took 137 ms while the loading thread's pool was
alive, 95 ms with that thread kept single-threaded (1 row: 62 against 54 ms).

So such a process makes torch single-threaded before it loads the model
(`keep_single_threaded`), and the scheduler's thread takes the threads it had (`use`): only
that thread keeps a pool.
"""

from __future__ import annotations

import torch

# Elements of a tensor whose sum runs as a parallel region (above ATen's grain size of 32768).
_PARALLEL_ELEMENTS = 1 << 16


def keep_single_threaded() -> int:
    """From now on, torch runs single-threaded in this thread and in every thread that starts
    torch work later; returns the threads it had (what the model's thread should get)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def use(threads: int) -> None:
    """Run torch with `threads` threads in this thread, whatever is set elsewhere afterwards.

    ATen reads the process-wide count into a thread's own OpenMP setting once, at the thread's
    first parallel region; one is run here, so a later `keep_single_threaded` elsewhere leaves
    this thread's count alone.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    torch.ones(_PARALLEL_ELEMENTS).sum()
