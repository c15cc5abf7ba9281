"""`sharedllm eval ppl|needle|ruler|qa|summary`: the evaluation protocols of docs/evaluation.md."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sharedllm.cli.extras import require
from sharedllm.cli.options import EvidenceArguments, ModelArguments, TreeArguments, add_data_dir_argument
from sharedllm.common.config import TreeConfig
from sharedllm.common.data.corpora import CORPORA
from sharedllm.common.errors import InvalidInput
from sharedllm.common.evaluation import protocols
from sharedllm.common.evaluation.methods import METHODS, PPL_METHODS
from sharedllm.common.evaluation.summary import METHODS as SUMMARY_METHODS
from sharedllm.common.summaries.pipeline import DEFAULT_WORDS, SummarySettings

# The protocols and the model load in the handlers: the parser takes its choices from the
# torch-free `protocols`, so that `sharedllm eval ... --help` starts at once.
if TYPE_CHECKING:
    from sharedllm.common.baselines.streaming import StreamingLLM
    from sharedllm.common.engine.engine import Engine

MODEL = ModelArguments("the shipped default for the default model, else untrained", documents=False)
TREE = TreeArguments(TreeConfig())
EVIDENCE = EvidenceArguments(tuning=True)


def _add_shared(
    parser: argparse.ArgumentParser, default_methods: tuple[str, ...], methods: tuple[str, ...] = METHODS
) -> None:
    MODEL.add_arguments(parser.add_argument_group("model"))
    add_data_dir_argument(parser)
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=list(protocols.PPL_LENGTHS), help="context lengths in tokens"
    )
    parser.add_argument("--methods", nargs="+", choices=methods, default=list(default_methods))
    parser.add_argument(
        "--streaming-recent",
        type=int,
        help="StreamingLLM's recent window R (default: the model window minus its attention sinks)",
    )
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--plot", type=Path, help="write the figure(s) here (PNG)")
    group = parser.add_argument_group(
        "tree configuration of an untrained adapter (any of these: evaluate an untrained adapter built so, "
        "unset fields as TreeConfig's defaults; none: the shipped adapter, else an untrained default one)"
    )
    TREE.add_arguments(group)


def _check_plot(args: argparse.Namespace) -> None:
    """Before any work: a figure asked for needs matplotlib, which the `eval` extra brings."""
    if args.plot:
        require("--plot", "matplotlib", "eval")


def _tree_config(args: argparse.Namespace) -> TreeConfig | None:
    """The untrained adapter's config when any tree flag was given, else None (the adapter's own)."""
    if not TREE.given(args):
        return None
    if args.adapter is not None:
        raise InvalidInput("the tree flags build an untrained adapter; a trained --adapter carries its own config")
    return TREE.from_args(args)


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """`eval ppl`, `eval needle`, `eval ruler` and `eval summary`."""
    evaluate = sub.add_parser(name, help=help_text)
    commands = evaluate.add_subparsers(dest="eval_command", required=True)

    p = commands.add_parser("ppl", help="perplexity of the last W tokens against context length, with baselines")
    _add_shared(p, PPL_METHODS, PPL_METHODS)
    p.add_argument("--windows", type=int, default=2, help="scored windows per document and length")
    p.add_argument("--scored-tokens", type=int, default=256, help="W, tokens scored per window")
    p.add_argument(
        "--decoder-tokens", type=int, default=256, help="context tokens the decoder reads before the scored ones"
    )
    p.add_argument(
        "--corpora",
        nargs="+",
        choices=CORPORA,
        default=list(CORPORA),
        help="whose held-out document to score (those fetched of these)",
    )
    EVIDENCE.add_arguments(p.add_argument_group("evidence (ranked for the decoder segment's text)"))
    p.set_defaults(handler=run_ppl)

    n = commands.add_parser("needle", help="passkey and needle retrieval accuracy per length x depth")
    _add_shared(n, protocols.NEEDLE_METHODS)
    n.add_argument("--depths", type=float, nargs="+", default=list(protocols.NEEDLE_DEPTHS), help="in [0, 1]")
    n.add_argument("--tasks", nargs="+", choices=protocols.NEEDLE_TASKS, default=list(protocols.NEEDLE_TASKS))
    n.add_argument("--per-cell", type=int, default=1, help="seeded tasks per length x depth")
    n.add_argument("--max-new-tokens", type=int, default=16)
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--no-retrieval", action="store_true", help="SharedLLM always expands the most recent child")
    EVIDENCE.add_arguments(n.add_argument_group("evidence"))
    n.set_defaults(handler=run_needle)

    r = commands.add_parser("ruler", help="the RULER-style suite: seven retrieval tasks per length, every method")
    _add_shared(r, protocols.RULER_METHODS)
    r.add_argument("--tasks", nargs="+", choices=tuple(protocols.RULER_TASKS), default=list(protocols.RULER_TASKS))
    r.add_argument("--per-cell", type=int, default=4, help="seeded samples per task and length")
    r.add_argument("--max-new-tokens", type=int, default=48)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-retrieval", action="store_true", help="SharedLLM always expands the most recent child")
    EVIDENCE.add_arguments(r.add_argument_group("evidence"))
    r.set_defaults(handler=run_ruler, lengths=None)

    q = commands.add_parser(
        "qa", help="prose questions on held-out texts: right, in the evidence, looping; grounded, free, anchor"
    )
    MODEL.add_arguments(q.add_argument_group("model"))
    add_data_dir_argument(q)
    q.add_argument("--questions", type=Path, nargs="+", help="question files (default: the shipped ones, 48 questions)")
    q.add_argument("--methods", nargs="+", choices=protocols.QA_METHODS, default=list(protocols.QA_METHODS))
    q.add_argument("--max-new-tokens", type=int, default=protocols.QA_MAX_NEW_TOKENS)
    q.add_argument("--json", type=Path, help="write the full report here")
    EVIDENCE.add_arguments(q.add_argument_group("evidence"))
    q.set_defaults(handler=run_qa)

    m = commands.add_parser(
        "summary",
        help="summaries of held-out documents of each kind: names and terms covered, absent facts, support",
    )
    MODEL.add_arguments(m.add_argument_group("model"))
    add_data_dir_argument(m)
    m.add_argument("--max-tokens", type=int, default=32768, help="each document's first tokens (default 32768)")
    m.add_argument("--words", type=int, default=DEFAULT_WORDS, help=f"the summaries' bound (default {DEFAULT_WORDS})")
    m.add_argument("--methods", nargs="+", choices=SUMMARY_METHODS, default=list(SUMMARY_METHODS))
    m.add_argument("--documents", nargs="+", help="only these held-out documents (e.g. persuasion locale)")
    m.add_argument("--json", type=Path, help="write the full report here")
    m.set_defaults(handler=run_summary)


def _load(args: argparse.Namespace) -> tuple[Engine, StreamingLLM | None, dict[str, Any]]:
    """The engine, the streaming baseline when asked for, and a description of both for the report."""
    from sharedllm.common.baselines.streaming import DEFAULT_SINKS, StreamingLLM
    from sharedllm.common.engine.engine import Engine

    engine = Engine.from_choice(MODEL.from_args(args), tree_config=_tree_config(args))
    streaming = None
    if "streaming" in args.methods:
        streaming = StreamingLLM(engine.body, args.streaming_recent or engine.window - DEFAULT_SINKS)
    setup = {
        "model": args.model or "default",
        "adapter": str(args.adapter) if args.adapter else ("shipped default" if engine.trained else "untrained"),
        "adapter_trained": engine.trained,
        "adapter_fingerprint": engine.adapter.fingerprint(),
        "tree_config": engine.adapter.config.to_dict(),
        "device": str(engine.body.device),
        "dtype": str(engine.body.dtype),
        "streaming": None
        if streaming is None
        else {"sinks": streaming.sinks, "recent": streaming.recent, "piece": streaming.piece},
    }
    return engine, streaming, setup


def _title(setup: dict[str, Any]) -> str:
    c = setup["tree_config"]
    return (
        f"{setup['model']}, adapter: {setup['adapter']} "
        f"(M={c['n_layers']} C={c['chunk_size']} D={c['depth']} P={c['pool_size']} {c['encoding']})"
    )


def _finish(report: dict[str, Any], table: str, setup: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the table and notes; write the JSON report."""
    from sharedllm.benchmark.report import write_json

    notes = []
    if not setup["adapter_trained"] and "sharedllm" in args.methods:
        notes.append(
            "the adapter is untrained: its o_proj is zero, so sharedllm equals evidence alone (and tree equals "
            "window alone) by construction"
        )
    report = {"setup": setup, **report, "notes": notes}
    print(_title(setup))
    print(table)
    for note in notes:
        print(f"note: {note}")
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")


def run_ppl(args: argparse.Namespace) -> int:
    _check_plot(args)
    from sharedllm.common.evaluation import ppl
    from sharedllm.common.evaluation.heldout import heldout_documents

    engine, streaming, setup = _load(args)
    settings = ppl.PplSettings(
        tuple(args.lengths),
        args.windows,
        args.scored_tokens,
        args.decoder_tokens,
        tuple(args.methods),
        EVIDENCE.from_args(args),
    )
    settings.check_window(engine.window)
    documents = heldout_documents(args.data_dir, engine.tokenizer, args.corpora)
    report = ppl.evaluate_perplexity(engine, documents, settings, streaming)
    _finish(report, ppl.format_table(report), setup, args)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        ppl.plot_perplexity(report, args.plot, _title(setup))
        print(f"wrote {args.plot}")
    return 0


def run_needle(args: argparse.Namespace) -> int:
    _check_plot(args)
    from sharedllm.common.data.synthetic import Filler
    from sharedllm.common.evaluation import needle
    from sharedllm.common.evaluation.heldout import heldout_book_text

    engine, streaming, setup = _load(args)
    settings = needle.NeedleSettings(
        tuple(args.lengths),
        tuple(args.depths),
        tuple(args.tasks),
        tuple(args.methods),
        args.per_cell,
        args.max_new_tokens,
        not args.no_retrieval,
        args.seed,
        EVIDENCE.from_args(args),
    )
    fillers = {}
    if "passkey" in settings.tasks:
        fillers["passkey"] = Filler(engine.tokenizer)
    if "needle" in settings.tasks:
        haystack, text = heldout_book_text(args.data_dir)
        fillers["needle"] = Filler(engine.tokenizer, text)
        setup["needle_haystack"] = haystack
    report = needle.evaluate_needles(engine, fillers, settings, streaming)
    _finish(report, needle.format_table(report), setup, args)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        for path in needle.plot_heatmaps(report, args.plot, _title(setup)):
            print(f"wrote {path}")
    return 0


def run_ruler(args: argparse.Namespace) -> int:
    _check_plot(args)
    from sharedllm.common.data.synthetic import Filler, needle_haystack_text
    from sharedllm.common.evaluation import ruler
    from sharedllm.common.evaluation.heldout import heldout_book_text

    engine, streaming, setup = _load(args)
    settings = ruler.RulerSettings(
        tuple(args.lengths or protocols.RULER_LENGTHS),
        tuple(args.tasks),
        tuple(args.methods),
        args.per_cell,
        args.max_new_tokens,
        not args.no_retrieval,
        args.seed,
        EVIDENCE.from_args(args),
    )
    haystacks = {ruler.TASKS[t][0] for t in settings.tasks}
    fillers = {}
    if "noise" in haystacks:
        fillers["noise"] = Filler(engine.tokenizer)
    if "prose" in haystacks:
        setup["prose_haystack"], text = heldout_book_text(args.data_dir)
        fillers["prose"] = Filler(engine.tokenizer, text)
    if "needles" in haystacks:
        fillers["needles"] = Filler(engine.tokenizer, needle_haystack_text(args.seed))
    report = ruler.evaluate_ruler(engine, fillers, settings, streaming)
    _finish(report, ruler.format_table(report), setup, args)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {ruler.plot_heatmap(report, args.plot, _title(setup))}")
    return 0


def run_qa(args: argparse.Namespace) -> int:
    from sharedllm.benchmark.report import write_json
    from sharedllm.common.engine.engine import Engine
    from sharedllm.common.evaluation import qa

    settings = qa.QaSettings(tuple(args.methods), args.max_new_tokens, EVIDENCE.from_args(args))
    sets = [qa.load_questions(path) for path in args.questions or qa.shipped_question_files()]
    engine = Engine.from_choice(MODEL.from_args(args))
    report = qa.evaluate_qa(engine, sets, args.data_dir, settings)
    print(qa.format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def run_summary(args: argparse.Namespace) -> int:
    from sharedllm.benchmark.report import write_json
    from sharedllm.common.engine.engine import Engine
    from sharedllm.common.evaluation import summary

    if args.max_tokens < 1:
        raise InvalidInput("--max-tokens must be >= 1")
    SummarySettings(words=args.words)  # refuses a bad bound before the model loads
    engine = Engine.from_choice(MODEL.from_args(args))
    documents = summary.heldout_documents(args.data_dir, engine.tokenizer, args.max_tokens, args.documents)
    report = summary.evaluate_summaries(engine, documents, args.words, args.methods)
    print(summary.format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0
