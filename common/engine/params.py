"""What a question asks for: sampling and evidence parameters, validated, with no torch.

Plain values, so that clients (`sharedllm generate`, the batch worker) build and check them
without loading the model's libraries.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from sharedllm.common.engine.loop_guard import DEFAULT_MIN_RUN
from sharedllm.common.errors import InvalidInput

EvidenceMode = Literal["auto", "spread"]
Grounding = Literal["quote", "facts", "off"]
GROUNDING_MODES: tuple[str, ...] = ("quote", "facts", "off")
EVIDENCE_MODES: tuple[str, ...] = ("auto", "spread")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TOP_K = 1_000_000
MAX_REPETITION_PENALTY = 10.0
# Below this a penalty would divide logits by ~0 (overflow to inf, then NaN probabilities).
MIN_REPETITION_PENALTY = 0.01
MAX_LOOP_GUARD = 1024
MAX_SENTENCES = 1024
# SamplingParams fields that travel as optional scalars of a GenerateRequest, under the same names.
SAMPLING_FIELDS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "seed",
    "max_sentences",
    "loop_guard",
)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; 0 / 1.0 disable top_k / top_p.

    grounding, for an answer about a document: "quote" answers with the document's sentences that
    the evidence ranking puts first (quotes.py; the model writes where there is no evidence);
    "facts": the model writes, and states only numbers, names, terms and quotes that the document
    has (grounding.py); "off": free generation. loop_guard: an answer whose last this many tokens repeat an earlier
    run of it ends there (loop_guard.py); 0: no guard. max_sentences: an answer ends after this
    many sentences (sentence_limit.py); 0: no limit (summaries).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    grounding: Grounding = "quote"
    loop_guard: int = DEFAULT_MIN_RUN
    max_sentences: int = 1

    def validate(self, max_new_tokens_limit: int) -> None:
        """Raise InvalidInput naming the parameter, its limit and the value received."""

        def bad(name: str, rule: str, value: object) -> InvalidInput:
            return InvalidInput(f"{name} must be {rule}, got {value!r}")

        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise bad("max_new_tokens", f"an integer in [1, {max_new_tokens_limit}]", self.max_new_tokens)
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "finite and in [0, 100]", self.temperature)
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise bad("top_k", f"in [0, {MAX_TOP_K}]", self.top_k)
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]", self.top_p)
        if not math.isfinite(self.min_p) or not 0.0 <= self.min_p < 1.0:
            raise bad("min_p", "in [0, 1)", self.min_p)
        penalty = self.repetition_penalty
        if not math.isfinite(penalty) or not MIN_REPETITION_PENALTY <= penalty <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", f"in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}]", penalty)
        if self.grounding not in GROUNDING_MODES:
            raise bad("grounding", f"one of {', '.join(GROUNDING_MODES)}", self.grounding)
        if not isinstance(self.loop_guard, int) or not 0 <= self.loop_guard <= MAX_LOOP_GUARD:
            raise bad("loop_guard", f"an integer in [0, {MAX_LOOP_GUARD}]", self.loop_guard)
        if not isinstance(self.max_sentences, int) or not 0 <= self.max_sentences <= MAX_SENTENCES:
            raise bad("max_sentences", f"an integer in [0, {MAX_SENTENCES}]", self.max_sentences)
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", "in [0, 2**63)", self.seed)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} strings", f"{len(self.stop)} strings")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_CHARS:
                raise bad("each stop string", f"1 to {MAX_STOP_CHARS} characters", s[:40])


def free_generation(params: SamplingParams) -> SamplingParams:
    """The same parameters with no grounding, no loop guard and no sentence limit: answers as the
    model writes them (the baseline grounded answers are measured against, and what the speed
    benchmarks time: every method decodes by the same rule)."""
    return dataclasses.replace(params, grounding="off", loop_guard=0, max_sentences=0)


@dataclass(frozen=True)
class EvidenceSettings:
    """How a question's evidence is chosen; the defaults are the measured choice (README)."""

    tokens: int = 512  # budget of raw document tokens in the window; 0: none (the paper's setting)
    passage_tokens: int = 32
    tree_weight: float = 0.25  # weight of the tree score next to the lexical score
    hops: int = 8  # a chain is followed until it ends, at most this many links (each costs one passage)
    hop_max_df: int = 3
    neighbours_of: int = 4  # the best question hits that bring their neighbouring passages
    min_score: float = 0.25  # passages below this share of the best score are left out, budget or not
    # With excerpts in the window only the question reads the injection (evidence.shielded_spans):
    inject_excerpts: bool = False  # True: what precedes the question (system prompt, excerpts) reads it too
    inject_answer: bool = False  # True: what follows the question (the turn's end, the answer) reads it too
    mode: EvidenceMode = "auto"

    def __post_init__(self) -> None:
        """Refuse a bad value where the settings are made (flags, a request's overrides through
        dataclasses.replace, a config), so nothing that holds them needs to check them again."""
        if self.tokens < 0:
            raise InvalidInput(f"evidence_tokens must be >= 0, got {self.tokens}")
        if not 8 <= self.passage_tokens <= 1024:
            raise InvalidInput(f"passage_tokens must be in [8, 1024], got {self.passage_tokens}")
        if not (math.isfinite(self.tree_weight) and self.tree_weight >= 0):
            raise InvalidInput(f"tree_weight must be finite and >= 0, got {self.tree_weight}")
        for name, least in (("hops", 0), ("hop_max_df", 1), ("neighbours_of", 0)):
            if getattr(self, name) < least:
                raise InvalidInput(f"{name} must be >= {least}, got {getattr(self, name)}")
        if not 0.0 <= self.min_score <= 1.0:
            raise InvalidInput(f"min_score must be in [0, 1], got {self.min_score}")
        if self.mode not in EVIDENCE_MODES:
            raise InvalidInput(f"evidence mode must be one of {', '.join(EVIDENCE_MODES)}, got {self.mode!r}")
