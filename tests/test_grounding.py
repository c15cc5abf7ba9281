"""Grounded answers, the loop guard and citations, on the default model's real tokenizer.

The decode loop is driven by a scripted "model" whose logits prefer a fixed answer, so each test
knows what free generation writes and checks what grounding lets through instead.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoTokenizer

from sharedllm.common.engine.citations import cite
from sharedllm.common.engine.generation import decode
from sharedllm.common.engine.grounding import DocumentFacts, GroundedAnswer, is_fact
from sharedllm.common.engine.loop_guard import LoopGuard
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.quotes import quote_spans, quote_text
from sharedllm.common.engine.results import Finished, Passage, TokenDelta
from sharedllm.common.model_loading import resolve_model_path

DOCUMENT = (
    "Sir Walter Elliot, of Kellynch Hall, was born March 1, 1760.\n"
    "The pass key is 1934266. Remember it.\n"
    'The inscription read "Laura Place, Bath" in gold letters, and nothing else.\n'
    "Nevertheless the weather was fine, and the Laconia sailed in the summer of 1806."
)
NUMBERS = re.compile(r"\d+(?:[.,]\d+)*")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(resolve_model_path(None)))


@pytest.fixture(scope="module")
def facts() -> DocumentFacts:
    return DocumentFacts(DOCUMENT)


def text_of(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def scripted(tokenizer, answer: str, digits_rank: str = "0123456789"):
    """A model that writes `answer` (then its end token), preferring digits in `digits_rank`
    order and the end token next whenever the script's own token is refused."""
    script = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    vocab = len(tokenizer)
    digit_ids = [tokenizer.convert_tokens_to_ids(d) for d in digits_rank]
    step_count = {"n": -1}

    def step(ids: list[int]) -> torch.Tensor:
        step_count["n"] += 1
        return torch.tensor([float(min(step_count["n"], len(script) - 1))])

    def logits(h: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(vocab)
        for rank, d in enumerate(digit_ids):
            out[d] = 5.0 - 0.1 * rank
        out[tokenizer.eos_token_id] = 4.0
        out[script[int(h.item())]] = 10.0
        return out

    return step, logits


def run(tokenizer, answer: str, params: SamplingParams, facts: DocumentFacts | None, **kwargs) -> tuple[str, Finished]:
    step, logits = scripted(tokenizer, answer, **kwargs)
    eos = {tokenizer.eos_token_id}
    grounding = GroundedAnswer(facts, text_of(tokenizer), eos) if facts is not None else None
    scripted_step = lambda ids: logits(step(ids))  # noqa: E731
    events = list(decode(scripted_step, [1, 2, 3], params, eos, text_of(tokenizer), torch.device("cpu"), grounding))
    streamed = "".join(e.text for e in events if isinstance(e, TokenDelta))
    finished = events[-1]
    assert isinstance(finished, Finished) and streamed == finished.text
    return streamed, finished


@pytest.mark.parametrize(
    ("word", "sentence_start", "fact"),
    [
        ("1934266", False, True),
        ("utf8", False, True),
        ("snake_case", False, True),
        ("NASA", False, True),
        ("getLogger", False, True),
        ("Laconia", False, True),
        ("Laconia", True, True),  # a name, though it opens a sentence: the document never writes it in lower case
        ("Nevertheless", True, False),  # an opener the document writes in lower case
        ("Nevertheless", False, True),  # the same word inside a sentence reads as a name
        ("The", True, False),
        ("I", False, False),
        ("weather", False, False),
    ],
)
def test_the_fact_rule(word, sentence_start, fact):
    lower = {"the", "nevertheless", "weather"}
    assert is_fact(word, sentence_start, lower) is fact


def test_facts_must_be_words_of_the_document(facts):
    assert facts.valid("The key is 1934266.", final=True)
    assert not facts.valid("The key is 1934267.", final=True)
    assert facts.valid("The key is 19342")  # may still become 1934266
    assert not facts.valid("The key is 19342", final=True)  # may not end inside it
    assert not facts.valid("The key is 19343")  # no number of the document starts so
    assert facts.valid("He sailed on the Laconia in 1806.", final=True)
    assert not facts.valid("He sailed on the Lusitania in 1806.", final=True)
    assert facts.valid("Kellynch Hall is his home.", final=True)
    assert not facts.valid("Zorblax is his home.", final=True)
    assert facts.valid("The weather was fine.", final=True)  # "the": an opener the document writes in lower case
    assert not facts.valid("Fortunately he went.", final=True)  # neither a word of it nor written in lower case


def test_list_numbers_and_separators_are_not_cut_off():
    facts = DocumentFacts("The numbers are 5806013 and 1,934,266. Also 42.")
    assert facts.valid("The list:\n1. 5806013\n2. 1,934,266", final=True)  # "1." and "2." are structure
    assert facts.valid("Numbers: 1,")  # may still become 1,934,266
    assert facts.valid("It is 42.", final=True) and facts.valid("It is 42,")
    assert not facts.valid("It is 43.", final=True)
    assert not facts.valid("Page 1. 5806013", final=True)  # a number inside a line is a fact
    assert not facts.valid("47.", final=True)  # a bare number ending the answer is an answer, not a list


def test_quotes_must_be_passages_of_the_document(facts):
    assert facts.valid('It read "Laura Place, Bath" in gold.', final=True)
    assert facts.valid('It read "Laura Place,\n  Bath".', final=True)  # white space counts as one space
    assert not facts.valid('It read "Laura Place, London" in gold.', final=True)
    assert facts.valid('It read "in gold')  # open, and a passage so far
    assert not facts.valid('It read "in gold', final=True)  # an answer may not end inside a quote
    assert not facts.valid('It read "in silver')


def test_a_number_absent_from_the_document_is_never_emitted(tokenizer, facts):
    free, _ = run(tokenizer, "The pass key is 1934267.", SamplingParams(grounding="off"), None)
    assert "1934267" in free  # the scripted model does write it when free
    grounded, finished = run(tokenizer, "The pass key is 1934267.", SamplingParams(), facts)
    assert "1934266" in grounded and "1934267" not in grounded
    assert finished.reason == "eos"
    # Sampling too: whatever the seed, every number written is one the document has.
    document_numbers = set(NUMBERS.findall(DOCUMENT))
    for seed in range(8):
        params = SamplingParams(temperature=1.5, seed=seed, max_new_tokens=24)
        text, _ = run(tokenizer, "Born in 1759 and 1934267, then 42.", params, facts, digits_rank="9876543210")
        assert set(NUMBERS.findall(text)) <= document_numbers, text


def test_an_invented_name_is_never_emitted(tokenizer, facts):
    free, _ = run(tokenizer, "He sailed on the Lusitania.", SamplingParams(grounding="off"), None)
    assert "Lusitania" in free
    grounded, _ = run(tokenizer, "He sailed on the Lusitania.", SamplingParams(), facts)
    assert "Lusitania" not in grounded
    words = re.findall(r"\w+", grounded)
    assert all(not w[0].isupper() or facts.has_word(w) or w == "He" for w in words), grounded


def test_the_loop_guard_ends_a_repeating_answer_before_the_repeat(tokenizer):
    looping = "The answer is five. The answer is five. The answer is five. The answer is five."
    params = SamplingParams(max_new_tokens=40, max_sentences=0)
    text, finished = run(tokenizer, looping, params, None)
    assert finished.reason == "repetition"
    # Cut where the repeated run of tokens starts: the second sentence's "The" (tokenised with its
    # space, unlike the first) was not part of it.
    assert text.count("answer is five") == 1 and text.startswith("The answer is five.")
    assert finished.completion_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    unguarded, finished = run(
        tokenizer, looping, SamplingParams(max_new_tokens=40, loop_guard=0, max_sentences=0), None
    )
    assert finished.reason == "eos" and unguarded.count("The answer is five.") == 4


def test_an_answer_ends_after_its_sentence_limit(tokenizer):
    answer = "Mr. Elliot paid 3.14 pounds, e.g. for the house. Then he left. Then he came back."
    one, finished = run(tokenizer, answer, SamplingParams(), None)
    assert one == "Mr. Elliot paid 3.14 pounds, e.g. for the house." and finished.reason == "stop"
    two, _ = run(tokenizer, answer, SamplingParams(max_sentences=2), None)
    assert two == "Mr. Elliot paid 3.14 pounds, e.g. for the house. Then he left."
    whole, finished = run(tokenizer, answer, SamplingParams(max_sentences=0), None)
    assert whole == answer and finished.reason == "eos"
    listed, _ = run(tokenizer, "The numbers are:\n1. 1858957\n2. 6265834.", SamplingParams(), None)
    assert listed.endswith("6265834.")  # a number's period ends no sentence


def test_the_loop_guard_releases_ordinary_text_at_once():
    guard = LoopGuard(8)
    released = [t for token in [5, 6, 7, 8, 9] for t in guard.push(token)]
    assert released == [5, 6, 7, 8, 9] and not guard.looped
    assert guard.push(5) == [] and guard.push(6) == []  # could be the start of a repeat: held back
    assert guard.push(1) == [5, 6, 1]  # it was not


def test_citations_point_at_the_quoted_text(facts):
    start = DOCUMENT.index("The inscription")
    passages = (Passage(0, 10, 0, 60, DOCUMENT[:60], 1.0), Passage(10, 40, start, len(DOCUMENT), DOCUMENT[start:], 0.9))
    answer = "It was Laura Place, Bath in gold letters, and the Laconia sailed in the summer of 1806."
    citations = cite(answer, facts, passages)
    assert citations
    for c in citations:
        assert c.text == DOCUMENT[c.char_start : c.char_end]
        assert " ".join(c.text.split()) == " ".join(answer[c.answer_start : c.answer_end].split())
        assert c.evidence_index == 1  # both runs sit in the second excerpt
    cited = [answer[c.answer_start : c.answer_end] for c in citations]
    assert cited[0] == "Laura Place, Bath"  # the document quotes it: the quote mark ends the run
    assert cited[1].startswith("in gold letters, and")
    assert any("1806" in run for run in cited)
    assert cite("Nothing here matches zorblax", facts, passages) == ()
    # Runs match whole words: "ch Hall" is not cited inside "Kellynch Hall".
    assert all(c.text.split()[0] != "ch" for c in cite("ch Hall was his home", facts, passages))


def test_a_quote_is_the_best_ranked_excerpts_sentence():
    text = (
        "The first chapter tells of Kellynch Hall. Nothing happens there.\n\n"
        "Lady Russell then drove to her own lodgings, in Rivers Street. It rained.\n"
        "Admiral Croft took part in the Trafalgar action. He said so himself."
    )

    def passage(part: str, score: float) -> Passage:
        at = text.index(part)
        return Passage(0, 0, at, at + len(part), part, score)

    question = "In which street did Lady Russell have her lodgings?"
    lodgings = passage("then drove to her own lodgings, in Rivers", 1.0)
    spans = quote_spans(question, text, [passage("The first chapter", 0.5), lodgings])
    assert quote_text(text, spans) == "Lady Russell then drove to her own lodgings, in Rivers Street."
    # Excerpts that score nearly as well are quoted too, after the best.
    tied = [passage("took part in the Trafalgar", 0.97), lodgings]
    quoted = quote_text(text, quote_spans(question, text, tied))
    lodgings_sentence = "Lady Russell then drove to her own lodgings, in Rivers Street."
    assert quoted == lodgings_sentence + " Admiral Croft took part in the Trafalgar action."
    tied = [passage("took part in the Trafalgar", 1.0), passage("then drove to her own lodgings, in Rivers", 0.97)]
    quoted = quote_text(text, quote_spans(question, text, tied))
    assert quoted == "Admiral Croft took part in the Trafalgar action. " + lodgings_sentence
    assert quote_spans(question, text, []) == []
    # More ties than MAX_QUOTES: the question asks for a list, which the model writes instead.
    parts = ("The first chapter", "Nothing happens", "It rained", "He said so", "Admiral Croft", "Lady Russell then")
    many = [passage(part, 1.0) for part in parts]
    assert quote_spans(question, text, many) == []
    assert quote_spans("List all the streets where Lady Russell lodged.", text, [lodgings]) == []


def test_a_long_sentence_is_quoted_around_its_excerpt():
    text = "word " * 300 + "the needle is here " + "word " * 300
    at = text.index("the needle")
    spans = quote_spans("Where is the needle?", text, [Passage(0, 0, at, at + 18, "the needle is here", 1.0)])
    ((start, end),) = spans
    assert end - start <= 400 and start <= at and at + 18 <= end
    assert text[start:end].split()[0] == "word" and not text[start - 1].isalnum()


def test_a_sentence_running_over_lines_is_quoted_from_the_line_that_answers():
    """A fact on a line of its own after a clause with no closing mark is one "sentence" with it;
    cut to the cap, the quote keeps the line that holds the question's words and its value."""
    text = (
        "In the days of old the river ran, the shepherds fed their flocks upon the hills and sang;\n"
        "The special code of marble is 1940882.\n"
        "and the evening came."
    )
    at = text.index("the shepherds")
    excerpt = Passage(0, 0, at, len(text), text[at:], 1.0)
    quoted = quote_text(text, quote_spans("What is the special code of marble?", text, [excerpt], max_chars=96))
    assert "1940882" in quoted and quoted.startswith("The special code of marble")
    # As many of the question's words either way: the part that runs to the sentence's end wins.
    text = (
        "Woe to the bloody city! it is all full of lies and robbery; the prey departeth not;\n"
        "The special code of marble is 1940882.\nThe noise of a whip."
    )
    at = text.index("it is all")
    excerpt = Passage(0, 0, at, len(text), text[at:], 1.0)
    quoted = quote_text(text, quote_spans("What is the special code of marble?", text, [excerpt], max_chars=96))
    assert quoted == "The special code of marble is 1940882."


def test_a_question_about_two_things_quotes_a_sentence_for_each():
    text = (
        "The door code of the archive is 4817. The weather was fine.\n\n"
        "The harbour master of Port Wren is Ingrid Fallow."
    )
    door, harbour = text.index("The door"), text.index("The harbour")
    evidence = [
        Passage(0, 0, door, door + 37, text[door : door + 37], 1.0),
        Passage(0, 0, harbour, len(text), text[harbour:], 0.6),  # below the tie: not quoted for its score
    ]
    quoted = quote_text(
        text,
        quote_spans(
            "What is the door code of the archive, and who is the harbour master of Port Wren?", text, evidence
        ),
    )
    assert "4817" in quoted and "Ingrid Fallow" in quoted
    # A question about one thing gets one sentence.
    assert (
        quote_text(text, quote_spans("What is the door code of the archive?", text, evidence)) == text[door : door + 37]
    )


def test_of_excerpts_ranked_alike_the_one_with_the_questions_words_is_quoted_first():
    """A multi-hop excerpt takes the best excerpt's score; the quote still opens with the sentence
    that answers the question, not with the hop's, which comes first in the document."""
    text = (
        "A lying tongue hateth those that are afflicted by it.\n\nChapter 27\n\nThe special code of nectar is 1008968."
    )
    hop, fact = text.index("A lying"), text.index("The special")
    evidence = [
        Passage(0, 0, hop, hop + 53, text[hop : hop + 53], 1.1),
        Passage(0, 0, fact, len(text), text[fact:], 1.1),
    ]
    quoted = quote_text(text, quote_spans("What is the special code of nectar?", text, evidence))
    assert quoted.startswith("The special code of nectar is 1008968.")
