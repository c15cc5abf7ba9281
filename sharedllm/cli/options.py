"""The argument groups every command and service shares: each adds its flags and builds its value.

A group is declared once here and used by every front end that takes it (`ask`, `serve`,
`eval`, `bench`, `train`, `generate`), so a flag means the same everywhere and a new front end
(the batch worker) takes the same groups. Groups build the library's plain values
(ModelChoice, TreeConfig, SamplingParams, EvidenceSettings) and import
nothing heavy, so that light commands (`generate`, `compress`, `data`) never load torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from sharedllm.common.config import DTYPE_CHOICES, ENCODINGS, POOLINGS, POSITIONS, ModelChoice, TreeConfig
from sharedllm.common.engine.params import EVIDENCE_MODES, GROUNDING_MODES, EvidenceSettings, SamplingParams
from sharedllm.common.rpc.tls import ClientTls
from sharedllm.common.shipped import adapter_help

TRUE_WORDS = ("1", "true", "yes", "on")  # what a switch's SHAREDLLM_<FLAG> variable turns on with


def default_data_dir() -> Path:
    """$SHAREDLLM_DATA_DIR, else ./data (ignored by git: the texts are not committed)."""
    return Path(os.environ.get("SHAREDLLM_DATA_DIR") or "data")


def add_data_dir_argument(parser: argparse.ArgumentParser, what: str = "fetched corpora") -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=default_data_dir(), help=f"{what} (default: $SHAREDLLM_DATA_DIR or ./data)"
    )


class ModelArguments:
    """--model, --adapter, --device, --dtype and (where documents are read) --max-document-tokens."""

    def __init__(self, adapter_unset: str = "the shipped default for the default model", documents: bool = True):
        self.adapter_unset = adapter_unset
        self.documents = documents

    def add_arguments(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        parser.add_argument("--model", help="local HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
        parser.add_argument("--adapter", help=adapter_help(self.adapter_unset))
        parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
        parser.add_argument(
            "--dtype",
            default="auto",
            choices=DTYPE_CHOICES,
            help="weights and activations (auto: bfloat16 on GPUs, float32 on CPUs)",
        )
        if self.documents:
            parser.add_argument(
                "--max-document-tokens",
                type=int,
                help="refuse longer documents (default: 131072, or fewer where chunk positions would pass the window)",
            )

    def from_args(self, args: argparse.Namespace) -> ModelChoice:
        return ModelChoice(
            model=args.model,
            adapter=args.adapter,
            device=args.device,
            dtype=args.dtype,
            max_document_tokens=getattr(args, "max_document_tokens", None),
        )


# Tree flags -> TreeConfig fields.
_TREE_FLAGS = {
    "layers": "n_layers",
    "chunk_size": "chunk_size",
    "depth": "depth",
    "pool_size": "pool_size",
    "encoding": "encoding",
    "pooling": "pooling",
    "positions": "positions",
}


class TreeArguments:
    """The context tree's shape (docs/method.md §2). Every flag defaults to unset, so that a command can
    tell what the user asked for from what it takes from an adapter or a default tree."""

    def __init__(self, unset: TreeConfig) -> None:
        self.unset = unset  # what the help says an unset flag means

    def add_arguments(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        u = self.unset
        parser.add_argument("--layers", type=int, help=f"M (unset: {u.n_layers})")
        parser.add_argument("--chunk-size", type=int, help=f"C (unset: {u.chunk_size})")
        parser.add_argument("--depth", type=int, help=f"D (unset: {u.depth})")
        parser.add_argument("--pool-size", type=int, help=f"P (unset: {u.pool_size})")
        parser.add_argument("--encoding", choices=ENCODINGS, help=f"(unset: {u.encoding})")
        parser.add_argument("--pooling", choices=POOLINGS, help=f"(unset: {u.pooling})")
        parser.add_argument("--positions", choices=POSITIONS, help=f"(unset: {u.positions})")

    @staticmethod
    def given(args: argparse.Namespace) -> dict[str, Any]:
        """The TreeConfig fields the command line set."""
        return {field: getattr(args, flag) for flag, field in _TREE_FLAGS.items() if getattr(args, flag) is not None}

    def from_args(self, args: argparse.Namespace, base: TreeConfig | None = None) -> TreeConfig:
        """`base` (default: the unset tree) with the fields the command line set."""
        return dataclasses.replace(base or self.unset, **self.given(args))


class SamplingArguments:
    """How tokens are picked, and --no-retrieval."""

    def add_arguments(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        default = SamplingParams()
        parser.add_argument("--max-new-tokens", type=int, default=default.max_new_tokens)
        parser.add_argument("--temperature", type=float, default=default.temperature, help="0 = greedy")
        parser.add_argument("--top-k", type=int, default=default.top_k)
        parser.add_argument("--top-p", type=float, default=default.top_p)
        parser.add_argument("--min-p", type=float, default=default.min_p)
        parser.add_argument("--repetition-penalty", type=float, default=default.repetition_penalty)
        parser.add_argument("--seed", type=int)
        parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
        parser.add_argument("--no-retrieval", action="store_true", help="always expand the most recent half")
        parser.add_argument(
            "--max-sentences",
            type=int,
            help=f"the answer ends after this many sentences (default {default.max_sentences}; 0: no limit)",
        )
        parser.add_argument(
            "--loop-guard",
            type=int,
            default=default.loop_guard,
            help="the answer ends when its last N tokens repeat an earlier run of it (0: no guard)",
        )
        parser.add_argument(
            "--grounding",
            choices=GROUNDING_MODES,
            help="quote: answer with the document's best-ranked sentences; facts: the model writes, copying its "
            f"numbers, names, terms and quotes from the document; off: free generation (default: {default.grounding})",
        )

    def from_args(self, args: argparse.Namespace) -> SamplingParams:
        """The parameters as given; the engine validates them against the model's window."""
        return SamplingParams(
            **({} if args.max_sentences is None else {"max_sentences": args.max_sentences}),
            **({} if args.grounding is None else {"grounding": args.grounding}),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=tuple(args.stop),
            loop_guard=args.loop_guard,
        )


class EvidenceArguments:
    """How much of the window holds excerpts of the document, and (tuning) how they are chosen."""

    def __init__(self, tuning: bool = False) -> None:
        self.tuning = tuning  # the passage and ranking flags, for servers and evaluations

    def add_arguments(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        default = EvidenceSettings()
        parser.add_argument(
            "--evidence-tokens",
            type=int,
            help=f"document tokens placed in the window as excerpts chosen for the question (default "
            f"{default.tokens}; 0: none, the tree alone, the paper's setting)",
        )
        parser.add_argument(
            "--evidence-mode",
            choices=EVIDENCE_MODES,
            help="auto: passages ranked for the question (the default); spread: evenly across the document",
        )
        if not self.tuning:
            return
        parser.add_argument("--passage-tokens", type=int, default=default.passage_tokens, help="passage size")
        parser.add_argument("--evidence-hops", type=int, default=default.hops, help="multi-hop rounds (0: none)")
        parser.add_argument(
            "--tree-weight", type=float, default=default.tree_weight, help="weight of the tree score in the ranking"
        )
        parser.add_argument(
            "--neighbours-of", type=int, default=default.neighbours_of, help="best hits that bring their neighbours"
        )
        parser.add_argument(
            "--min-score",
            type=float,
            default=default.min_score,
            help="leave out passages below this share of the best score (0: fill the budget)",
        )
        parser.add_argument(
            "--inject-excerpts",
            action="store_true",
            help="let the prompt before the question (system prompt, excerpts) read the tree too "
            "(default: with excerpts, only the question does)",
        )
        parser.add_argument(
            "--inject-answer",
            action="store_true",
            help="with excerpts, let what follows the question (the turn's end, the answer) read the tree too "
            "(default: only the question does)",
        )

    def from_args(self, args: argparse.Namespace) -> EvidenceSettings:
        """The settings the flags ask for, validated."""
        changes: dict[str, Any] = {"tokens": args.evidence_tokens, "mode": args.evidence_mode or "auto"}
        if self.tuning:
            changes |= {
                "passage_tokens": args.passage_tokens,
                "hops": args.evidence_hops,
                "tree_weight": args.tree_weight,
                "neighbours_of": args.neighbours_of,
                "min_score": args.min_score,
                "inject_excerpts": args.inject_excerpts,
                "inject_answer": args.inject_answer,
            }
        return EvidenceSettings(**{k: v for k, v in changes.items() if v is not None})


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


class ClientTlsArguments:
    """--tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name: how a client secures its channel.

    Each defaults to SHAREDLLM_<FLAG> in the environment, as --api-key does, so that a container's
    health check or a script picks up the deployment's files without repeating them. Any of them
    turns TLS on; none leaves the channel in plaintext, as the services listen by default.
    """

    def add_arguments(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        switch = os.environ.get("SHAREDLLM_TLS", "").strip().lower() in TRUE_WORDS
        parser.add_argument(
            "--tls",
            action="store_true",
            default=switch,
            help="use TLS, verifying the server against gRPC's default roots (default: $SHAREDLLM_TLS)",
        )
        parser.add_argument(
            "--tls-ca",
            type=Path,
            default=_env_path("SHAREDLLM_TLS_CA"),
            help="PEM roots the server's certificate must chain to; turns TLS on (default: $SHAREDLLM_TLS_CA)",
        )
        parser.add_argument(
            "--tls-cert",
            type=Path,
            default=_env_path("SHAREDLLM_TLS_CERT"),
            help="PEM certificate chain to present, for mutual TLS (default: $SHAREDLLM_TLS_CERT)",
        )
        parser.add_argument(
            "--tls-key",
            type=Path,
            default=_env_path("SHAREDLLM_TLS_KEY"),
            help="PEM private key of --tls-cert (default: $SHAREDLLM_TLS_KEY)",
        )
        parser.add_argument(
            "--tls-server-name",
            default=os.environ.get("SHAREDLLM_TLS_SERVER_NAME") or None,
            help="name the server's certificate must carry when the target does not say it, e.g. replicas "
            "listed by address (default: $SHAREDLLM_TLS_SERVER_NAME)",
        )

    def from_args(self, args: argparse.Namespace) -> ClientTls | None:
        """The channel's TLS settings, checked; None for plaintext."""
        files = (args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
        if not args.tls and all(value is None for value in files):
            return None
        return ClientTls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)


class ClientArguments:
    """How a client reaches a service: --target, --api-key, --timeout-s, TLS; --json output."""

    def __init__(self) -> None:
        self.tls = ClientTlsArguments()

    def add_arguments(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        parser.add_argument("--target", required=True, help="HOST:PORT of the service")
        parser.add_argument(
            "--api-key", default=os.environ.get("SHAREDLLM_API_KEY"), help="API key (default: $SHAREDLLM_API_KEY)"
        )
        parser.add_argument("--timeout-s", type=float, help="deadline of the call (default: none)")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        self.tls.add_arguments(parser)
