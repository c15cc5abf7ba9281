"""What each evaluation protocol runs unless told otherwise: its tasks, methods, lengths and depths.

Apart from the protocols themselves (ppl.py, needle.py, ruler.py, qa.py), which load torch and
the model code, so that `sharedllm eval` builds its parser (these choices and defaults) at once.
"""

from __future__ import annotations

from collections.abc import Callable

from sharedllm.common.data.synthetic import Filler, Task, needle_task, variables_task

PPL_LENGTHS: tuple[int, ...] = (2048, 4096, 8192, 16384, 32768, 65536)

NEEDLE_TASKS: tuple[str, ...] = ("passkey", "needle")
NEEDLE_METHODS: tuple[str, ...] = ("sharedllm", "full", "truncation", "streaming")
NEEDLE_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

# RULER task name -> (haystack, builder(filler, length, depth, seed))
RULER_TASKS: dict[str, tuple[str, Callable[[Filler, int, float, int], Task]]] = {
    "single_noise": ("noise", needle_task),
    "single_prose": ("prose", needle_task),
    "multikey_prose": ("prose", lambda f, n, d, s: needle_task(f, n, d, s, n_distractors=3)),
    "multikey_needles": ("needles", needle_task),
    "multivalue": ("prose", lambda f, n, d, s: needle_task(f, n, d, s, n_values=4)),
    "multiquery": ("prose", lambda f, n, d, s: needle_task(f, n, d, s, n_queries=4)),
    "variables": ("noise", variables_task),
}
RULER_METHODS: tuple[str, ...] = ("sharedllm", "evidence", "bm25", "tree", "full", "truncation")
RULER_LENGTHS: tuple[int, ...] = (4096, 8192, 16384, 32768)

QA_METHODS: tuple[str, ...] = ("sharedllm", "facts", "free", "anchor")
QA_MAX_NEW_TOKENS = 64
