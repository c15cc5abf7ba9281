"""`sharedllm bench`: SharedLLM against full attention and StreamingLLM, in one run; or, with
--concurrency, one decoder under many clients at once (continuous batching); or, with --soak-s,
a mixed load of questions and compressions held for minutes.

sharedllm bench --json bench/results/serving.json --plot-dir bench/results
sharedllm bench --concurrency 1 2 4 8 16 --json bench/results/concurrency/cpu.json
sharedllm bench --soak-s 600 --json bench/results/soak/cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sharedllm.benchmark.load import LoadConfig, format_load, run_load
from sharedllm.benchmark.measure import GRPC_METHOD, LOCAL_METHODS
from sharedllm.benchmark.report import format_table, write_json, write_plots
from sharedllm.benchmark.runner import BenchConfig, run_benchmark
from sharedllm.benchmark.soak import SoakConfig, format_soak, run_soak
from sharedllm.cli.extras import require
from sharedllm.cli.options import ModelArguments
from sharedllm.common.config import Limits
from sharedllm.common.errors import InvalidInput

DEFAULT_LENGTHS: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536)
LENGTH_128K = 131072
MODEL = ModelArguments("the shipped default for the default model, else untrained", documents=False)


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    MODEL.add_arguments(p.add_argument_group("model"))
    p.add_argument(
        "--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="document tokens (default: %(default)s)"
    )
    p.add_argument("--with-128k", action="store_true", help=f"also measure {LENGTH_128K} tokens")
    p.add_argument("--repeats", type=int, default=3, help="repetitions of every cell (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=LOCAL_METHODS, default=list(LOCAL_METHODS))
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per answer (default: %(default)s)")
    p.add_argument(
        "--up-to",
        type=_up_to,
        action="append",
        default=[],
        metavar="METHOD=TOKENS",
        help="measure METHOD (one of --methods, or grpc) only on documents up to TOKENS long; repeatable. "
        "Full attention grows quadratically: on 2 CPU cores it alone takes minutes at 32K tokens",
    )
    p.add_argument(
        "--grpc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure SharedLLM through the gRPC services and a private redis-server",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads in every cell and service (default: torch's choice). Where other jobs share the "
        "cores, 1 is far faster: oversubscribed threads slow the many small ops of decoding many times over",
    )
    load = p.add_argument_group("concurrency (one decoder, many clients, over gRPC)")
    load.add_argument(
        "--concurrency", type=int, nargs="+", metavar="CLIENTS", help="measure these numbers of clients at once"
    )
    load.add_argument("--load-tokens", type=int, default=8192, help="tokens of each document (default: %(default)s)")
    load.add_argument("--documents", type=int, default=4, help="documents of the different-documents workload")
    load.add_argument("--questions", type=int, default=2, help="questions each client asks per level")
    load.add_argument("--max-batch", type=int, default=16, help="the decoder's --max-batch (default: %(default)s)")
    load.add_argument(
        "--prefix-cache-mib",
        type=int,
        help="the decoder's --prefix-cache-mib (default: the decoder's); 0: every prompt is read in full",
    )
    load.add_argument(
        "--unbatched-baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="first measure one client against a decoder without batching (--max-batch 0), in the same run",
    )
    soak = p.add_argument_group("soak (questions and compressions at once, for minutes, over gRPC)")
    soak.add_argument("--soak-s", type=float, help="hold the load this long")
    soak.add_argument("--soak-questions", type=int, default=SoakConfig().questions, help="questions in flight")
    soak.add_argument("--soak-compressions", type=int, default=SoakConfig().compressions, help="compressions in flight")
    soak.add_argument("--soak-tokens", type=int, default=SoakConfig().tokens, help="tokens of each document")
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--plot-dir", type=Path, help="write ttft.png and memory.png here")
    p.set_defaults(handler=run_bench)


def _up_to(text: str) -> tuple[str, int]:
    method, _, tokens = text.partition("=")
    if method not in (*LOCAL_METHODS, GRPC_METHOD) or not tokens.isdigit():
        raise argparse.ArgumentTypeError(f"expected METHOD=TOKENS with METHOD in {(*LOCAL_METHODS, GRPC_METHOD)}")
    return method, int(tokens)


def bench_config(args: argparse.Namespace) -> BenchConfig:
    lengths = sorted({*args.lengths, *([LENGTH_128K] if args.with_128k else [])})
    limit = Limits().max_document_tokens
    if not all(1 <= n <= limit for n in lengths):
        raise InvalidInput(f"--lengths must be in [1, {limit}] tokens, got {lengths}")
    for flag, value in (("--repeats", args.repeats), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise InvalidInput(f"{flag} must be >= 1, got {value}")
    if args.threads is not None and args.threads < 1:
        raise InvalidInput(f"--threads must be >= 1, got {args.threads}")
    return BenchConfig(
        lengths=tuple(lengths),
        methods=tuple(dict.fromkeys(args.methods)),
        repeats=args.repeats,
        max_new_tokens=args.max_new_tokens,
        model=args.model,
        adapter=args.adapter,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        grpc=args.grpc,
        up_to=dict(args.up_to),
    )


def service_model_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """The model flags the services get, so that they run what the command line chose."""
    flags = [("--model", args.model), ("--adapter", args.adapter), ("--device", args.device)]
    flags.append(("--dtype", args.dtype if args.dtype != "auto" else None))
    return tuple(part for flag, value in flags if value for part in (flag, value))


def _at_least(minimum: int, **flags: int) -> None:
    """A one-line error naming the first flag below `minimum` (its name with dashes)."""
    for name, value in flags.items():
        if value < minimum:
            raise InvalidInput(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def load_config(args: argparse.Namespace) -> LoadConfig:
    _at_least(
        1,
        concurrency=min(args.concurrency),
        load_tokens=args.load_tokens,
        documents=args.documents,
        questions=args.questions,
        max_new_tokens=args.max_new_tokens,
        max_batch=args.max_batch,
    )
    if args.prefix_cache_mib is not None:
        _at_least(0, prefix_cache_mib=args.prefix_cache_mib)
    return LoadConfig(
        concurrency=tuple(sorted(set(args.concurrency))),
        tokens=args.load_tokens,
        documents=args.documents,
        questions=args.questions,
        max_new_tokens=args.max_new_tokens,
        max_batch=args.max_batch,
        threads=args.threads,
        model=args.model,
        model_flags=service_model_flags(args),
        unbatched_baseline=args.unbatched_baseline,
        prefix_cache_mib=args.prefix_cache_mib,
    )


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _print_report(table: str, report: dict, args: argparse.Namespace) -> int:
    print(table)
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def run_concurrency(args: argparse.Namespace) -> int:
    report = run_load(load_config(args), _progress)
    return _print_report(format_load(report), report, args)


def soak_config(args: argparse.Namespace) -> SoakConfig:
    if args.soak_s <= 0:
        raise InvalidInput(f"--soak-s must be > 0, got {args.soak_s}")
    _at_least(1, soak_questions=args.soak_questions, soak_tokens=args.soak_tokens, max_new_tokens=args.max_new_tokens)
    _at_least(0, soak_compressions=args.soak_compressions)
    return SoakConfig(
        seconds=args.soak_s,
        questions=args.soak_questions,
        compressions=args.soak_compressions,
        tokens=args.soak_tokens,
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
        model=args.model,
        model_flags=service_model_flags(args),
    )


def run_soak_command(args: argparse.Namespace) -> int:
    report = run_soak(soak_config(args), _progress)
    return _print_report(format_soak(report), report, args)


def run_bench(args: argparse.Namespace) -> int:
    if args.soak_s is not None:
        return run_soak_command(args)
    if args.concurrency:
        return run_concurrency(args)
    if args.plot_dir:
        require("--plot-dir", "matplotlib", "bench")
    report = run_benchmark(bench_config(args), lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot_dir:
        for path in write_plots(report, args.plot_dir):
            print(f"wrote {path}")
    return 0
