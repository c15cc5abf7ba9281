#!/usr/bin/env bash
# Every figure the README reports, on this machine, in one go (not timed in one go; the quality runs of step 2 alone took about two hours on 2 CPU cores, step 5 about one hour, step 6 about 40 minutes).
# Writes JSON, tables and plots under bench/results/. Run after `make setup` and `sharedllm data fetch`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=bench/results
mkdir -p "$OUT"

# 1. Embedded mode on a 32K-token document (issue: engine): compression, first token, tokens/s.
$BIN/python - <<'PY'
from pathlib import Path
from transformers import AutoTokenizer
from sharedllm.common.model_loading import resolve_model_path
tok = AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
text = Path("data/texts/austen/persuasion.txt").read_text(encoding="utf-8")
ids = tok(text, add_special_tokens=False)["input_ids"][:32768]
Path("bench/results/persuasion-32k.txt").write_text(tok.decode(ids), encoding="utf-8")
PY
for dtype in float32 bfloat16; do
  $BIN/sharedllm ask "$OUT/persuasion-32k.txt" "Who is Anne Elliot's father?" --max-new-tokens 48 --json \
    --dtype "$dtype" > "$OUT/ask-32k-$dtype.json"
done
$BIN/sharedllm ask "$OUT/persuasion-32k.txt" "Who is Anne Elliot's father?" --max-new-tokens 48 --json \
  --adapter pool32 > "$OUT/ask-32k-float32-pool32.json"

# 2. Quality against the baselines.
#    In the window (the training issue's gap-closed target): every held-out corpus, 8 windows each;
#    the decoder reads 256 raw tokens, so the rest of the context reaches it only compressed.
$BIN/sharedllm eval ppl --lengths 2048 4096 --windows 8 --methods sharedllm window full truncation \
  --json "$OUT/ppl-in-window.json" | tee "$OUT/ppl-in-window.txt"
#    Beyond the window, every method with the same raw recent text (one base window): SharedLLM's
#    decoder reads the last 7,680 context tokens and everything earlier compressed, truncation the
#    last 7,936, StreamingLLM 4 sinks and the last 8,188.
$BIN/sharedllm eval ppl --lengths 8192 16384 32768 --windows 1 --decoder-tokens 7680 --corpora austen bible \
  --methods sharedllm window truncation streaming \
  --json "$OUT/ppl-beyond-window.json" --plot "$OUT/ppl-beyond-window.png" | tee "$OUT/ppl-beyond-window.txt"
$BIN/sharedllm eval ppl --lengths 65536 --windows 1 --decoder-tokens 7680 --corpora austen bible \
  --methods sharedllm window truncation streaming \
  --json "$OUT/ppl-beyond-window-64k.json" | tee "$OUT/ppl-beyond-window-64k.txt"
#    The pool32 adapter (P=32: 4x compression) in and beyond the window; the baselines do not depend on
#    the adapter, so beyond the window only its own column and the window (a determinism check) run.
$BIN/sharedllm eval ppl --adapter pool32 --lengths 2048 4096 --windows 8 --methods sharedllm window full truncation \
  --json "$OUT/ppl-in-window-pool32.json" | tee "$OUT/ppl-in-window-pool32.txt"
$BIN/sharedllm eval ppl --adapter pool32 --lengths 8192 16384 32768 65536 --windows 1 --decoder-tokens 7680 \
  --corpora austen bible --methods sharedllm window \
  --json "$OUT/ppl-beyond-window-pool32.json" | tee "$OUT/ppl-beyond-window-pool32.txt"
# The bf16 fast path against fp32 with the same (fp32-trained) adapter.
#    (--lengths 4096 alone scores the same windows as the fp32 run's 4K row.)
$BIN/sharedllm eval ppl --lengths 4096 --windows 8 --methods sharedllm window \
  --dtype bfloat16 --json "$OUT/ppl-in-window-bfloat16.json" | tee "$OUT/ppl-in-window-bfloat16.txt"
$BIN/sharedllm eval needle --tasks passkey --lengths 4096 16384 32768 --depths 0.25 0.75 --per-cell 1 \
  --methods sharedllm truncation streaming --streaming-recent 2044 \
  --json "$OUT/needle.json" --plot "$OUT/needle.png" | tee "$OUT/needle.txt"
$BIN/sharedllm eval needle --tasks needle --lengths 4096 16384 32768 --depths 0.25 0.75 --per-cell 1 \
  --methods sharedllm truncation streaming --streaming-recent 2044 \
  --json "$OUT/needle-natural.json" --plot "$OUT/needle-natural.png" | tee "$OUT/needle-natural.txt"
$BIN/sharedllm eval needle --adapter pool32 --tasks passkey needle --lengths 4096 16384 32768 --depths 0.25 0.75 \
  --per-cell 1 --methods sharedllm --json "$OUT/needle-pool32.json" | tee "$OUT/needle-pool32.txt"

# 3. Speed and memory against full attention and streaming, and the gRPC + Redis path, in fp32
#    and in bf16 (AMX on this CPU), every method in the same precision within a run.
for dtype in float32 bfloat16; do
  mkdir -p "$OUT/$dtype"
  $BIN/sharedllm bench --threads 2 --repeats 1 --max-new-tokens 16 --dtype "$dtype" \
    --up-to full=32768 --up-to streaming=32768 \
    --json "$OUT/$dtype/serving-2core.json" --plot-dir "$OUT/$dtype" | tee "$OUT/$dtype/serving-2core.txt"
done

# 4. Where a question's time goes (in-process store against Redis; cold, then cached).
for dtype in float32 bfloat16; do
  $BIN/python bench/profile_question.py "$OUT/persuasion-32k.txt" --dtype "$dtype" \
    --json "$OUT/$dtype/profile-32k.json" | tee "$OUT/$dtype/profile-32k.txt"
done

# 5. Answers about the document (the evidence issue): the RULER-style suite, every method side by
#    side. The product's own methods (tree + evidence, evidence alone, tree alone) with 3 samples per
#    task and length; the base-window baselines with 1 (each costs a full 8K prefill here); single
#    needles at 64K and 128K. Then time to first token at 32K against full attention, with the
#    default evidence budget.
EV="$OUT/evidence"
mkdir -p "$EV"
$BIN/sharedllm eval ruler --lengths 4096 8192 16384 32768 --per-cell 6 --methods sharedllm evidence bm25 tree \
  --json "$EV/ruler.json" --plot "$EV/ruler.png" | tee "$EV/ruler.txt"
$BIN/sharedllm eval ruler --lengths 65536 --per-cell 2 --methods sharedllm evidence bm25 \
  --json "$EV/ruler-64k.json" | tee "$EV/ruler-64k.txt"
for ablation in "base:" "tree-weight-0:--tree-weight 0" "hops-0:--evidence-hops 0"; do
  # shellcheck disable=SC2086  # the flags are two words
  $BIN/sharedllm eval ruler --lengths 8192 32768 --per-cell 3 --methods evidence ${ablation#*:} \
    --json "$EV/ablation-${ablation%%:*}.json" | tee "$EV/ablation-${ablation%%:*}.txt"
done
$BIN/sharedllm eval ruler --lengths 4096 8192 16384 32768 --per-cell 1 --methods full truncation \
  --json "$EV/ruler-baselines.json" --plot "$EV/ruler-baselines.png" | tee "$EV/ruler-baselines.txt"
$BIN/sharedllm eval ruler --lengths 4096 8192 16384 32768 --per-cell 1 --methods streaming \
  --json "$EV/ruler-streaming.json" --plot "$EV/ruler-streaming.png" | tee "$EV/ruler-streaming.txt"
$BIN/sharedllm eval ruler --lengths 65536 131072 --per-cell 2 --tasks single_noise single_prose \
  --methods sharedllm evidence --json "$EV/ruler-single-128k.json" | tee "$EV/ruler-single-128k.txt"
$BIN/sharedllm bench --threads 2 --repeats 2 --max-new-tokens 16 --lengths 32768 --methods sharedllm full \
  --grpc --json "$EV/bench-32k.json" | tee "$EV/bench-32k.txt"
$BIN/python bench/planted_codes.py --json "$EV/planted-codes.json" | tee "$EV/planted-codes.txt"
$BIN/python bench/demo_questions.py --json "$EV/demo-questions.json" | tee "$EV/demo-questions.txt"

# 6. Batch jobs (the Celery issue): summaries of the held-out narratives checked for names (the
#    product against the base model on the first window), documents per minute of 32K-token
#    documents with the embedded worker and with the services.
BA="$OUT/batch"
mkdir -p "$BA"
$BIN/sharedllm eval summary --json "$BA/summary.json" | tee "$BA/summary.txt"
$BIN/python bench/batch_throughput.py --documents 2 --tokens 32768 --json "$BA/throughput.json" | tee "$BA/throughput.txt"
$BIN/python bench/batch_throughput.py --documents 8 --tokens 8192 --modes embedded --in-flight 1 2 4 8 \
  --json "$BA/in-flight.json" | tee "$BA/in-flight.txt"

# 6b. One decoder under many clients (continuous batching), with one client against a decoder
#     without batching first, in the same run; a decode step by batch size, with a second
#     OpenMP pool alive beside the model's thread, and with the linears packed or plain.
mkdir -p "$OUT/concurrency"
$BIN/sharedllm bench --concurrency 1 2 4 8 16 --load-tokens 8192 --documents 4 --questions 1 \
  --max-new-tokens 256 --threads 2 --json "$OUT/concurrency/cpu-256.json" | tee "$OUT/concurrency/cpu-256.txt"
$BIN/sharedllm bench --concurrency 1 2 4 8 16 --load-tokens 8192 --documents 4 --questions 1 \
  --max-new-tokens 256 --threads 2 --prefix-cache-mib 0 --json "$OUT/concurrency/cpu-256-no-prefix-cache.json" \
  | tee "$OUT/concurrency/cpu-256-no-prefix-cache.txt"
$BIN/python bench/batch_step.py --json "$OUT/concurrency/step.json" | tee "$OUT/concurrency/step.txt"
$BIN/python bench/thread_pools.py --json "$OUT/concurrency/thread-pools.json" | tee "$OUT/concurrency/thread-pools.txt"
$BIN/python bench/prefill_chunk.py --chunks 64 512 --clients 8 --json "$OUT/concurrency/prefill-chunk.json" \
  | tee "$OUT/concurrency/prefill-chunk.txt"
$BIN/python bench/same_answers.py --json "$OUT/concurrency/same-answers.json" | tee "$OUT/concurrency/same-answers.txt"
$BIN/python bench/packed_linear.py --repeats 9 --json "$OUT/concurrency/packed-linear.json" | tee "$OUT/concurrency/packed-linear.txt"
$BIN/python bench/step_roofline.py --json "$OUT/concurrency/step-roofline.json" | tee "$OUT/concurrency/step-roofline.txt"
$BIN/python bench/step_roofline.py --dtype bfloat16 --json "$OUT/concurrency/step-roofline-bf16.json" \
  | tee "$OUT/concurrency/step-roofline-bf16.txt"

# 7. Tracing (the observability issue): its cost on a repeat question, and one question's spans.
mkdir -p "$OUT/telemetry"
$BIN/python bench/trace_overhead.py --tokens 32768 --repeats 9 --out "$OUT/telemetry" | tee "$OUT/telemetry/overhead.txt"

# 8. Hardening (the hardening issue): what hostile and legitimate uploads cost the compressor.
mkdir -p "$OUT/hardening"
$BIN/python bench/upload_limits.py --json "$OUT/hardening/uploads.json" | tee "$OUT/hardening/uploads.txt"

# 9. Grounded answers (the grounded-answers issue): prose questions, the RULER-style suite grounded
#    against free in one run, single needles at 128K, and what grounding costs in time.
GR="$OUT/grounding"
mkdir -p "$GR"
$BIN/sharedllm eval qa --json "$GR/qa.json" | tee "$GR/qa.txt"
$BIN/sharedllm eval ruler --lengths 4096 8192 16384 32768 --per-cell 6 --methods sharedllm facts free \
  --json "$GR/ruler.json" | tee "$GR/ruler.txt"
$BIN/sharedllm eval ruler --lengths 131072 --per-cell 2 --tasks single_noise single_prose --methods sharedllm \
  --json "$GR/ruler-single-128k.json" | tee "$GR/ruler-single-128k.txt"
$BIN/python bench/grounding_overhead.py --tokens 32768 --repeats 5 --out "$GR" | tee "$GR/overhead.txt"

# 10. Several documents and growing contexts (the multi-document issue): one question across 2, 4 and
#     8 documents against the right document alone and plain BM25 over all; an append of 1K tokens to
#     a 32K-token context against compressing it again, in memory and on a private redis-server.
REDIS_DIR=$(mktemp -d)
redis-server --port 6399 --save '' --appendonly no --dir "$REDIS_DIR" --daemonize yes
$BIN/python bench/multi_document.py --redis-url redis://127.0.0.1:6399/0 --samples 6 --out "$OUT/documents"
redis-cli -p 6399 shutdown nosave || true
