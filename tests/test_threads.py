"""A batching decoder leaves torch's threads to the scheduler's thread alone (engine/threads.py).

Each case runs in a fresh process, loaded as a server loads it (`load_runtime` in a thread of its
own, after `--torch-threads 2` in the main thread): the setting is process-wide, and this test
process's threads must keep theirs. Recorded: the threads of the scheduler's model steps, of the
loading thread, and of a thread that starts torch work afterwards (as each gRPC worker does).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROCESS = """
import argparse, json, sys, threading
import torch
from sharedllm.cli.server_options import ServerArguments
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.rpc.server import load_runtime

parser = argparse.ArgumentParser()
arguments = ServerArguments(default_port=0)
arguments.add_arguments(parser)
config = arguments.from_args(parser.parse_args(sys.argv[1:]))
torch.set_num_threads(config.torch_threads)
seen = {}

def load():
    runtime = load_runtime(config)
    seen["loading thread"] = torch.get_num_threads()
    engine = runtime.engine
    if engine.scheduler is not None:
        step = engine.decoder.step_rows
        def recorded(*args):
            seen["model steps"] = torch.get_num_threads()
            return step(*args)
        engine.decoder.step_rows = recorded
    seen["runtime"] = runtime

def later():
    torch.ones(1 << 16).sum()
    seen["later thread"] = torch.get_num_threads()
    params = SamplingParams(max_new_tokens=2, grounding="off")
    list(seen["runtime"].generate(None, "Hello?", params))
    seen.setdefault("model steps", torch.get_num_threads())  # unbatched: this thread steps the model

for target in (load, later):
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
del seen["runtime"]
print(json.dumps(seen))
"""


@pytest.mark.parametrize(
    ("max_batch", "expected"),
    [
        ("16", {"model steps": 2, "loading thread": 1, "later thread": 1}),
        ("0", {"model steps": 2, "loading thread": 2, "later thread": 2}),  # no scheduler: as before
    ],
)
def test_only_the_model_thread_keeps_torch_threads(tiny_model_dir, tiny_adapter, max_batch, expected):
    flags = ["--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--store-url", "memory://"]
    flags += ["--torch-threads", "2", "--max-batch", max_batch]
    done = subprocess.run([sys.executable, "-c", PROCESS, *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == expected


def test_use_refuses_no_threads():
    from sharedllm.common.engine import threads

    with pytest.raises(ValueError, match="threads must be >= 1"):
        threads.use(0)
