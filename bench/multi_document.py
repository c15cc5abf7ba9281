"""One question across several documents, and what growing a context costs.

    python bench/multi_document.py --out bench/results/documents

Across documents (a RULER-style multi-key task spread over documents): each sample takes k
documents (k = --documents, default 2 4 8) of 4K-16K tokens cut from the Bible (Job onwards,
held out of training), plants one fact "The special code of <key> is <7 digits>." in each, at a
random line, compresses each document under its own id, and asks for every key. Methods:
- `across`: the product, one question over all k contexts (context_ids; quoted answers as shipped);
- `alone (right document)`: the question asked of the one document that holds the fact: an
  upper bound a user reaches only by knowing where the fact is (otherwise by asking all k);
- `bm25 over all`: plain BM25 passages from all k documents with the same budget, no tree, the
  model writing freely (the RULER suite's baseline).
A sample scores 1 when the answer holds the planted value.

Growing a context: a --grow-tokens document (default 32K) is compressed under an id, then
--append-tokens more (default 1K, the text that follows it) are appended; against compressing
the whole grown text again. Time (median of --repeats) and bytes written to the store.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from itertools import dropwhile
from pathlib import Path

from sharedllm.common.data.corpora import read_bible
from sharedllm.common.engine.documents import JoinedContexts
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.params import SamplingParams, free_generation
from sharedllm.common.engine.results import run_to_end
from sharedllm.common.evaluation.methods import plain_bm25
from sharedllm.common.runtime import ContextRuntime
from sharedllm.common.store import open_store

KEYS = [
    "amber",
    "basil",
    "cedar",
    "dune",
    "ember",
    "fjord",
    "garnet",
    "heron",
    "indigo",
    "juniper",
    "kestrel",
    "lotus",
    "marble",
    "nectar",
    "onyx",
    "pebble",
]
QUESTION = "What is the special code of {key}?"
FACT = "The special code of {key} is {value}."


def haystack(tokenizer, n_tokens: int) -> list[int]:
    """Token ids of held-out Bible books (Job onwards) to cut documents from."""
    ids: list[int] = []
    for book in dropwhile(lambda b: b.name != "Job", read_bible()):
        ids += tokenizer(book.text + "\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    return ids


def documents(engine: Engine, pool: list[int], k: int, rng: random.Random) -> tuple[list[str], list[tuple[str, str]]]:
    """k documents of 4K-16K tokens, each with one planted fact at a line start; (key, value) per document."""
    tok = engine.tokenizer
    texts, facts = [], []
    keys = rng.sample(KEYS, k)
    for key in keys:
        n = rng.randint(4096, 16384)
        start = rng.randrange(0, len(pool) - n)
        text = tok.decode(pool[start : start + n], clean_up_tokenization_spaces=False)
        text = text[text.find("\n") + 1 :]
        lines = text.split("\n")
        at = rng.randrange(1, len(lines) - 1)
        value = str(rng.randrange(1_000_000, 9_999_999))
        lines.insert(at, FACT.format(key=key, value=value))
        texts.append("\n".join(lines))
        facts.append((key, value))
    return texts, facts


def ask(runtime, method, ids, holder, joined, question, params, bm25) -> str:
    """One method's answer to `question` (see the module docstring)."""
    engine = runtime.engine
    if method == "across":
        return run_to_end(runtime.generate(ids, question, params)).text
    if method == "alone (right document)":
        return run_to_end(runtime.generate(holder, question, params)).text
    plan = engine.plan(
        joined, question, max_new_tokens=params.max_new_tokens, evidence=bm25, retrieval=False, inject=False
    )
    return run_to_end(engine.decode(plan, free_generation(params))).text


def across_documents(engine: Engine, args: argparse.Namespace) -> dict:
    pool = haystack(engine.tokenizer, 400_000)
    runtime = ContextRuntime(engine, open_store("memory://?max_bytes=2000000000"), decoded_cache_bytes=0)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    bm25 = plain_bm25(runtime.evidence)
    rows, answers = [], []
    for k in args.documents:
        scores: dict[str, list[float]] = {"across": [], "alone (right document)": [], "bm25 over all": []}
        seconds: dict[str, list[float]] = {m: [] for m in scores}
        tokens = []
        for sample in range(args.samples):
            rng = random.Random(f"{args.seed}-{k}-{sample}")
            texts, facts = documents(engine, pool, k, rng)
            ids = [runtime.compress_text(t, context_id=f"s{k}-{sample}-{i}").context_id for i, t in enumerate(texts)]
            tokens.append(sum(runtime.store.info(c).manifest.n_tokens for c in ids))
            joined = JoinedContexts([runtime.store.open(c, runtime.fingerprints) for c in ids], ids)
            for holder, (key, value) in enumerate(facts):
                question = QUESTION.format(key=key)
                for method in scores:
                    started = time.perf_counter()
                    answer = ask(runtime, method, ids, ids[holder], joined, question, params, bm25)
                    seconds[method].append(time.perf_counter() - started)
                    scores[method].append(float(value in answer))
                    answers.append({"documents": k, "sample": sample, "method": method, "key": key, "value": value,
                                    "holder": holder, "answer": answer})  # fmt: skip
        for method in scores:
            rows.append(
                {
                    "documents": k,
                    "tokens_mean": round(statistics.mean(tokens)),
                    "method": method,
                    "questions": len(scores[method]),
                    "score": round(100 * statistics.mean(scores[method]), 1),
                    "seconds_per_question": round(statistics.median(seconds[method]), 3),
                }
            )
            print(rows[-1], flush=True)
    return {"rows": rows, "answers": answers}


def growing(engine: Engine, args: argparse.Namespace) -> dict:
    ids = haystack(engine.tokenizer, args.grow_tokens + args.append_tokens + 10)
    tok = engine.tokenizer
    text = tok.decode(ids[: args.grow_tokens + args.append_tokens], clean_up_tokenization_spaces=False)
    cut = len(tok.decode(ids[: args.grow_tokens], clean_up_tokenization_spaces=False))
    cut = text.rindex(" ", 0, cut)  # the addition starts at a word boundary
    store_urls = ["memory://?max_bytes=2000000000", *([args.redis_url] if args.redis_url else [])]
    rows = []
    for url in store_urls:
        runtime = ContextRuntime(engine, open_store(url), decoded_cache_bytes=0)
        append_s, whole_s, appended = [], [], None
        for repeat in range(args.repeats):
            runtime.compress_text(text[:cut], context_id=f"grow-{repeat}")
            started = time.perf_counter()
            appended = runtime.append_text(f"grow-{repeat}", text[cut:])
            append_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            whole = runtime.compress_text(text, context_id=f"whole-{repeat}")
            whole_s.append(time.perf_counter() - started)
        assert appended is not None
        rows.append(
            {
                "store": url.split(":")[0],
                "context_tokens": appended.context.n_tokens,
                "appended_tokens": appended.context.n_tokens
                - len(tok(text[:cut], add_special_tokens=False)["input_ids"]),
                "encoded_tokens": appended.encoded_tokens,
                "append_s": round(statistics.median(append_s), 3),
                "append_bytes_written": appended.bytes_written,
                "recompress_s": round(statistics.median(whole_s), 3),
                "recompress_bytes_written": whole.stored_bytes,
                "time_ratio": round(statistics.median(whole_s) / statistics.median(append_s), 1),
                "bytes_ratio": round(whole.stored_bytes / appended.bytes_written, 1),
            }
        )
        print(rows[-1], flush=True)
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--samples", type=int, default=6, help="samples per document count")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--grow-tokens", type=int, default=32768)
    parser.add_argument("--append-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--redis-url", help="also measure the append on this Redis")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", choices=["across", "growing"], action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("bench/results/documents"))
    args = parser.parse_args()
    engine = Engine.load()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "report.json"
    # A part skipped keeps its last recorded result; the protocol is recorded per part.
    report = json.loads(path.read_text()) if path.is_file() else {}
    protocol = {k: v for k, v in vars(args).items() if k not in ("out", "skip")}
    report.pop("protocol", None)  # (files written before the protocol was recorded per part)
    if "growing" not in args.skip:
        report["growing"] = {"protocol": protocol, **growing(engine, args)}
        path.write_text(json.dumps(report, indent=2))
    if "across" not in args.skip:
        report["across"] = {"protocol": protocol, **across_documents(engine, args)}
    path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
