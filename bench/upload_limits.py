"""What uploads cost the compressor: hostile ones refused, the largest legitimate one, a repeat.

    python bench/upload_limits.py --json bench/results/hardening/uploads.json

A private redis-server and both services with the default model, limits and adapter. Four
uploads, one at a time, each with the compressor's peak resident memory reset before it
(/proc/PID/clear_refs) and read after it:
  1. 60 MB of prose streamed in 1 MiB pieces (the hostile probe's upload: 93 s and a 10 GB
     peak before the byte limit was derived from the token limit);
  2. 2 MiB of "a a a ..." (within the byte limit, about 1M tokens: refused by the token count);
  3. the largest document the limits accept, the serving benchmark's text cut to
     --tokens tokens and sent as text (a legitimate call's memory and time);
  4. the same document again (deduplicated: handed back, not compressed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from sharedllm.benchmark.report import write_json
from sharedllm.benchmark.services import grpc_stack
from sharedllm.benchmark.workload import document_tokens
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2, compressor_pb2_grpc
from sharedllm.common.rpc.client import PIECE_BYTES, call_metadata, open_channel
from sharedllm.common.telemetry.memory import peak_resident_bytes, reset_peak, resident_bytes

MIB = 1 << 20
PROSE = b"Then Naomi her mother in law said unto her, My daughter, shall I not seek rest for thee?\n"


def memory_mib(pid: int) -> dict[str, float]:
    return {"VmRSS": resident_bytes(pid) / MIB, "VmHWM": peak_resident_bytes(pid) / MIB}


def pieces(data: bytes, repeats: int = 1) -> Iterator[compressor_pb2.CompressStreamRequest]:
    for _ in range(repeats):
        for start in range(0, len(data), PIECE_BYTES):
            yield compressor_pb2.CompressStreamRequest(text=data[start : start + PIECE_BYTES])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=131_000, help="the legitimate document's tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from sharedllm.common.model_loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
    document = tokenizer.decode(document_tokens(tokenizer, args.tokens)).encode()
    mib = PROSE * (PIECE_BYTES // len(PROSE))
    uploads = [
        ("60 MB of prose", lambda: pieces(mib, 60)),
        ("2 MiB at 2 bytes a token", lambda: pieces(b"a " * (1 << 20))),
        (f"{len(document) / 1e6:.2f} MB document ({args.tokens} tokens)", lambda: pieces(document)),
        ("the same document again", lambda: pieces(document)),
    ]
    report: dict = {"threads": args.threads, "runs": []}
    with tempfile.TemporaryDirectory() as workdir, grpc_stack(Path(workdir), [], args.threads, ["load"]) as targets:
        pid, metadata = targets.pids["compressor"], call_metadata(targets.api_keys["load"])
        report["idle_mib"] = round(memory_mib(pid)["VmRSS"])
        with open_channel(targets.compressor) as channel:
            stub = compressor_pb2_grpc.CompressorServiceStub(channel)
            for name, messages in uploads:
                reset_peak(pid)
                before = memory_mib(pid)["VmRSS"]
                started = time.perf_counter()
                try:
                    context = stub.CompressStream(messages(), metadata=metadata, timeout=1800).context
                    outcome = f"OK ({'reused' if context.reused else f'{context.document_tokens} tokens stored'})"
                except grpc.RpcError as exc:
                    outcome = f"{exc.code().name}: {exc.details()}"
                seconds = time.perf_counter() - started
                after = memory_mib(pid)
                run = {
                    "upload": name,
                    "outcome": outcome,
                    "seconds": round(seconds, 2),
                    "peak_above_before_mib": round(after["VmHWM"] - before, 1),
                    "rss_after_mib": round(after["VmRSS"], 1),
                }
                report["runs"].append(run)
                print(json.dumps(run), flush=True)
    if args.json:
        write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
