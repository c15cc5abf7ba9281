"""The summary pipeline (common/summaries) without a model: units and their spans, kinds of text,
the extractive choice, support, the filters, the length bound, and the model's part driven by a
scripted writer (the real model's part runs in tests/test_batch.py and tests/test_cli.py)."""

from __future__ import annotations

import json
import time

import pytest

from sharedllm.common.errors import InvalidInput
from sharedllm.common.evaluation.summary import check_pipeline, check_text
from sharedllm.common.summaries import extract, filters, kinds
from sharedllm.common.summaries.pipeline import SummarySettings, section_spans, summarize
from sharedllm.common.summaries.salience import Vocabulary, content_stems, salient_terms
from sharedllm.common.summaries.support import cover, source_of, supported
from sharedllm.common.summaries.units import clean, prose_of_code, units

STORY = [
    "Naomi lived in Moab with her two sons after the famine. Mr. Elimelech, her husband, had died there.",
    "Ruth stayed with Naomi when Orpah went home. Ruth worked in the barley fields of Bethlehem every day.",
    "Boaz owned the fields near Bethlehem and saw Ruth gleaning. Boaz told his reapers to leave grain for Ruth.",
    "The elders met at the gate of Bethlehem. Boaz bought the land of Elimelech before the elders and married Ruth.",
    "Ruth bore a son named Obed. The women of Bethlehem praised Naomi, and Naomi nursed the child.",
]


def varied(n: int = 60) -> str:
    """A narrative of `n` different sentences, a few sharing each name."""
    names = ("Alder", "Birch", "Cedar", "Dorran", "Elm", "Fenn", "Gorse", "Hazel", "Ivor", "Juniper", "Kestrel")
    verbs = ("carried", "mended", "sold", "painted", "guarded", "found", "buried")
    things = (
        "lantern",
        "boat",
        "fence",
        "wagon",
        "bridge",
        "barn",
        "mill",
        "well",
        "gate",
        "chest",
        "loom",
        "cart",
        "rope",
    )
    places = ("Ashford", "Brookmere", "Cinderby", "Dunmore", "Eastwick", "Farrow", "Glenholm")
    return "\n\n".join(f"{names[i % 11]} {verbs[i % 7]} a {things[i % 13]} by {places[i % 5]}." for i in range(n))


def story(repeats: int = 3) -> str:
    """A narrative in paragraphs, each part about its own people, long enough for several sections."""
    filler = "The days were long and the road was dusty, and the harvest went on in the heat of the sun. "
    return "\n\n".join(part + " " + filler * repeats for part in STORY * 4)


GLOSSARY = "\n\n".join(
    f"{term}\n   {meaning}"
    for term, meaning in [
        ("iterator", "An object representing a stream of data, returned by iter()."),
        ("generator", "A function which returns a generator iterator, written with yield."),
        ("decorator", "A function returning another function, applied with the @wrapper syntax."),
        ("module", "An object that serves as an organizational unit of Python code."),
        ("package", "A Python module which can contain submodules or subpackages."),
        ("coroutine", "A more generalized form of subroutine, entered and exited at many points."),
        ("mapping", "A container object that supports arbitrary key lookups."),
        ("sequence", "An iterable which supports efficient element access using integer indices."),
        ("namespace", "The place where a variable is stored, implemented as a dictionary."),
    ]
)
DICTIONARY = "\n\n".join(
    f"{head}, {part} {meaning}"
    for head, part, meaning in [
        ("ABASE", "v. t.", "To lower or depress in rank, office or estimation."),
        ("ABATE", "v. t.", "To make less in amount, degree or force."),
        ("ABBEY", "n.", "A monastery or convent governed by an abbot or an abbess."),
        ("ABDICATE", "v. t.", "To give up a throne or an office formally."),
        ("ABHOR", "v. t.", "To regard with horror and loathing, as an abbey abhors noise."),
        ("ABIDE", "v. i.", "To wait for and to remain stable in a place."),
        ("ABLE", "a.", "Having power sufficient to do a thing."),
        ("ABODE", "n.", "A place of continuance, a dwelling or a home."),
        ("ABOLISH", "v. t.", "To do away with wholly, to put an end to."),
    ]
)
# A Bible dictionary's shape: each entry a paragraph opening "Headword, definition".
COMMA_DICTIONARY = "\n\n".join(
    f"{head}, {meaning}"
    for head, meaning in [
        ("Aaron", "the eldest son of Amram and Jochebed, and the brother of Moses and Miriam."),
        ("Abel", "the second son of Adam and Eve, who kept the flocks of his father."),
        ("Abraham", "the father of a multitude, who went out from Ur of the Chaldees to Canaan."),
        ("Bethlehem", "the house of bread, a town of Judah where Ruth gleaned in the fields."),
        ("Boaz", "a wealthy man of Bethlehem, kinsman of Elimelech, who married Ruth of Moab."),
        ("Canaan", "the land of the lowlands, promised to Abraham and to his seed after him."),
        ("Elimelech", "my God is king, the husband of Naomi, who went to Moab in the famine."),
        ("Moab", "the land east of the Dead Sea, where Naomi lived with her husband and sons."),
        ("Naomi", "my delight, the wife of Elimelech and the mother in law of Ruth and Orpah."),
        ("Ruth", "a woman of Moab who went with Naomi to Bethlehem and married Boaz."),
    ]
)
# A Markdown glossary: "- **Term**: definition".
MARKDOWN_GLOSSARY = "\n\n".join(
    f"- **{term}**: {meaning}"
    for term, meaning in [
        ("Broker", "The server that holds the queues of tasks until a worker takes them."),
        ("Chunk", "A fixed run of tokens that the compressor encodes on its own."),
        ("Context", "The stored tree of one document, read by the decoder for every question."),
        ("Decoder", "The service that answers questions about a stored context."),
        ("Lease", "A claim a worker holds on a document while it works on it."),
        ("Node", "One entry of the tree at one granularity, pooled from the level below."),
        ("Replica", "A copy of a service or a store that takes over when another goes away."),
        ("Tree", "The keys and values of a document at several granularities, one per level."),
    ]
)
SOURCE = '''"""Tools for queues of work.

A queue holds tasks until a worker takes them. Workers report progress to the queue.
"""

import threading


class Queue:
    """A queue of tasks, shared by workers."""

    def __init__(self, size):
        # The lock guards the list of tasks.
        self.lock = threading.Lock()
        self.tasks = []

    def put(self, task):
        """Add a task at the end of the queue."""
        with self.lock:
            self.tasks.append(task)


def drain(queue):
    """Take every task out of the queue, in order."""
    out = []
    while queue.tasks:
        out.append(queue.tasks.pop(0))
    return out
'''
DOCUMENTATION = """Queues
======

The queue module implements multi-producer, multi-consumer queues. It is especially useful in
threaded programming when information must be exchanged safely between threads.

Usage
-----

Create a queue with ``Queue(maxsize)``. The :func:`put` method adds an item; :func:`get` removes one.

.. note::

   A queue of size zero is unbounded.

Errors
------

The :exc:`Full` exception is raised when a bounded queue is full and blocking is off.
"""


# ---- units ----------------------------------------------------------------------------


def test_units_are_sentences_with_their_spans_and_abbreviations_do_not_cut_them():
    text = story(0)
    found = units(text)
    assert found and all(
        clean(text[u.start : u.end]).rstrip(";,") == u.text.rstrip(".") or clean(text[u.start : u.end]) == u.text
        for u in found
    )
    assert "Mr. Elimelech, her husband, had died there." in [u.text for u in found]
    assert all(u.words >= 5 for u in found)


def test_long_sentences_are_cut_at_clauses_and_shown_as_sentences():
    clause = "the reapers went out into the fields of barley at dawn"
    text = "; ".join([clause] * 8).capitalize() + "."
    found = units(text)
    assert len(found) > 1 and all(u.text.endswith(".") and u.words <= 60 for u in found)


def test_prose_of_code_keeps_offsets_and_only_docstrings_and_comments():
    masked = prose_of_code(SOURCE)
    assert len(masked) == len(SOURCE) and masked.count("\n") == SOURCE.count("\n")
    assert "threading" not in masked.replace("threading.", "") or "import" not in masked
    texts = [u.text for u in units(masked)]
    assert "A queue holds tasks until a worker takes them." in texts
    assert "The lock guards the list of tasks." in texts
    assert not any("self.tasks" in t or "def " in t for t in texts)


# ---- kinds ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "detail"),
    [
        (story(), "narrative", "narrative"),
        (GLOSSARY, "reference", "glossary or dictionary"),
        (DICTIONARY, "reference", "glossary or dictionary"),
        (COMMA_DICTIONARY, "reference", "glossary or dictionary"),
        (MARKDOWN_GLOSSARY, "reference", "glossary or dictionary"),
        (SOURCE, "technical", "source code"),
        (DOCUMENTATION, "technical", "documentation"),
    ],
)
def test_each_kind_of_text_is_recognised_and_named_in_the_first_line(text, kind, detail):
    summary = summarize(text, None, SummarySettings(words=120))
    assert (summary.kind, summary.detail) == (kind, detail)
    first = summary.overview.text
    assert first.split()[0] in {"A", "Source", "Technical"} and first.endswith(".")
    assert summary.overview.spans and all(0 <= a < b <= len(text) for a, b in summary.overview.spans)
    if kind == "reference":
        assert "with entries from " in first and "main subjects: " in first


def test_a_reference_works_range_and_main_subjects():
    first = summarize(DICTIONARY, None, SummarySettings(words=120)).overview.text
    assert 'from "ABASE" to "ABOLISH"' in first and "ABBEY" in first  # "abbey" is mentioned twice
    comma = summarize(COMMA_DICTIONARY, None, SummarySettings(words=120))
    assert 'from "Aaron" to "Ruth"' in comma.overview.text
    heads = ("Aaron", "Abel", "Abraham", "Bethlehem", "Boaz", "Canaan", "Elimelech", "Moab", "Naomi", "Ruth")
    assert all(s.text.split(",")[0] in heads for s in comma.sentences)  # entries, each headword first
    glossary = summarize(MARKDOWN_GLOSSARY, None, SummarySettings(words=120)).overview.text
    assert 'from "Broker" to "Tree"' in glossary


def test_paragraphs_opening_with_a_name_and_a_comma_do_not_make_a_narrative_a_dictionary():
    text = "\n\n".join(
        f"{name}, {rest}"
        for name, rest in [
            ("Ruth", "however, stayed with Naomi and would not go back to Moab."),
            ("Naomi", "seeing that she was steadfast, left speaking unto her."),
            ("Boaz", "then went up to the gate and sat him down there."),
            ("Anne", "meanwhile, walked to the cottage and back again before dinner."),
            ("Elimelech", "the husband of Naomi, died in the land of Moab."),
            ("Orpah", "kissed her mother in law and went back to her people."),
            ("Boaz", "said to his reapers, Let her glean even among the sheaves."),
            ("Naomi", "said unto her, Blessed be he of the LORD."),
            ("Ruth", "lay at his feet until the morning, and rose up before one could know another."),
        ]
    )
    assert kinds.classify(text).kind == "narrative"


# ---- extraction -------------------------------------------------------------------------


def test_selection_covers_every_part_of_the_document_within_its_budget():
    text = story()
    sections = section_spans(text, 1500)
    terms = salient_terms([text[a:b] for a, b in sections], 40)
    pool = extract.candidates(units(text), [a for a, _ in sections], narrative=True)
    chosen = extract.select(pool, terms, ["Naomi", "Ruth", "Boaz", "Bethlehem"], 80)
    assert sum(c.unit.words for c in chosen) <= 80
    assert [c.unit.start for c in chosen] == sorted(c.unit.start for c in chosen)  # document order
    said = " ".join(c.unit.text for c in chosen)
    assert {"Naomi", "Ruth", "Boaz"} <= set(said.replace(",", " ").replace(".", " ").split())
    assert len({c.unit.text for c in chosen}) == len(chosen)  # the repeated parts are taken once


def test_an_instruction_steers_the_choice_to_its_words():
    plain = summarize(story(), None, SummarySettings(words=60)).text
    focused = summarize(story(), None, SummarySettings(words=60, instruction="the elders at the gate")).text
    assert "elders" in focused and focused != plain


# ---- support and filters ----------------------------------------------------------------


def test_support_needs_every_content_word_in_the_cited_spans_by_stem():
    document = "Boaz bought the land of Elimelech. Boaz married Ruth at Bethlehem."
    first, second = (0, 34), (35, len(document))
    sources = [source_of(document, [first]), source_of(document, [second])]
    assert cover("Boaz marries Ruth.", sources) == (second,)  # "marries" rests on "married"
    assert cover("Boaz bought land and married Ruth.", sources) == (first, second)
    assert cover("Boaz married Ruth in Moab.", sources) is None  # Moab is in neither
    assert cover("It was so.", sources) is None  # no content word: nothing to rest on
    assert supported("Boaz married Ruth.", document, [second])
    assert not supported("Boaz married Ruth.", document, [first])


def test_filters_refuse_questions_meta_sentences_loops_repeats_and_unknown_names():
    vocabulary = Vocabulary.of("Naomi went with Ruth to Bethlehem. The elders praised the child of Boaz.")
    said = [content_stems("Naomi went with Ruth to Bethlehem.")]  # what was kept before, by its stems
    cases = {
        "What is the main idea behind the paragraph?": "a question",
        "The text above contains several key points.": "about the task, not the document",
        "Here are the sentences you asked for.": "about the task, not the document",
        "The son of Boaz, the son of Boaz, the son of Boaz.": "a loop",
        "Naomi went with Ruth to Bethlehem again.": "a repeat",
        "Tophusa argued with Boaz.": "a name the document does not have",
        "Then Ruth": "unfinished",
        "\u05db\u05bc\u05dc\u05d5\u05b9 appears.": "letters the document never uses",
    }
    for sentence, why in cases.items():
        assert filters.rejection(sentence, vocabulary, said) == why, sentence
    assert filters.rejection("The elders praised the child.", vocabulary, said) is None
    assert filters.split_sentences("1. Naomi went home.\n2.\n3. Ruth stayed.") == ["Naomi went home.", "Ruth stayed."]


# ---- the pipeline -----------------------------------------------------------------------


@pytest.mark.parametrize("words", [40, 120, 300])
def test_every_summary_is_within_its_bound_supported_and_unrepeated(words):
    for text in (story(), GLOSSARY, DICTIONARY, SOURCE, DOCUMENTATION):
        summary = summarize(text, None, SummarySettings(words=words))
        assert summary.words <= words
        assert summary.sentences, text[:40]
        for sentence in summary.sentences:
            assert sentence.origin == "extract" and supported(sentence.text, text, sentence.spans)
        check = check_pipeline(text, summary)
        assert check.support == 1.0 and check.repeated_sentences == 0 and not check.absent


def test_bad_settings_and_empty_documents_are_refused():
    for bad in ({"words": 10}, {"words": 5000}, {"call_chars": 100}, {"instruction": "x" * 600}):
        with pytest.raises(InvalidInput):
            SummarySettings(**bad)
    with pytest.raises(InvalidInput, match="empty"):
        summarize(" \n ", None)


class ScriptedWriter:
    """Stands in for the model's text (the pipeline's logic is what is under test): each call gets
    the next scripted output, and its prompt is kept."""

    def __init__(self, outputs):
        self.outputs, self.prompts = list(outputs), []

    def __call__(self, prompt, params):
        self.prompts.append(prompt)
        return self.outputs[len(self.prompts) - 1] if len(self.prompts) <= len(self.outputs) else ""


def test_the_model_keeps_only_supported_sentences_and_cites_their_sources():
    text = story()
    writer = ScriptedWriter(
        ["Boaz married Ruth. The text above tells a story. Ruth sailed to Rome. What happened next?"]
    )
    summary = summarize(text, writer, SummarySettings(words=80, rewrite=True))
    model = [s for s in summary.sentences if s.origin == "model"]
    assert [s.text for s in model] == ["Boaz married Ruth."]
    assert supported(model[0].text, text, model[0].spans)
    refused = dict(summary.refused)
    assert refused["The text above tells a story."] == "about the task, not the document"
    assert refused["Ruth sailed to Rome."] in {"says what its sources do not", "a name the document does not have"}
    assert refused["What happened next?"] == "a question"
    assert summary.words <= 80 and summary.calls == tuple(writer.outputs)
    assert "Summarize the sentences above" in writer.prompts[0]


def test_long_inputs_go_in_levels_and_a_resumed_summary_repeats_no_call():
    text = varied()
    settings = SummarySettings(words=150, rewrite=True, call_chars=600)
    first = ScriptedWriter([""] * 20)
    summary = summarize(text, first, settings)
    assert len(first.prompts) > 2  # groups, then the whole
    assert all(len(p.rsplit("\n\n", 1)[0]) <= settings.call_chars for p in first.prompts)
    assert summary.words <= 150 and summary.sentences  # the model gave nothing: the extracts stand
    resumed = ScriptedWriter([])
    again = summarize(text, resumed, settings, done=summary.calls)
    assert again == summary and resumed.prompts == []
    saved: list[list[str]] = []
    summarize(text, ScriptedWriter([""] * 20), settings, on_call=lambda outputs: saved.append(outputs))
    assert [len(s) for s in saved] == list(range(1, len(first.prompts) + 1))


def test_summary_checks_count_names_terms_absent_facts_and_support():
    text = story()
    check = check_text(text, "Naomi and Ruth met Zephath in 1832 near Bethlehem. Boaz married Ruth.")
    assert {"Naomi", "Ruth", "Boaz", "Bethlehem"} <= set(check.names)
    assert {"Naomi", "Ruth", "Boaz", "Bethlehem"} <= set(check.names_mentioned)
    assert set(check.absent) == {"Zephath", "1832"}
    assert (check.sentences, check.supported) == (2, 1)


def test_a_long_document_is_summarised_in_seconds():
    text = story(12) * 6  # about 140,000 characters: a 32K-token document
    assert len(text) > 120_000
    started = time.perf_counter()
    summary = summarize(text, None)
    assert time.perf_counter() - started < 20 and summary.words <= 200


def test_summarize_command_prints_the_summary_its_sources_and_json(tmp_path, capsys):
    from sharedllm.cli import main

    path = tmp_path / "story.txt"
    path.write_text(story(), encoding="utf-8")
    assert main(["summarize", str(path), "--words", "80", "--evidence"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("A narrative whose main names are") and "sources:" in out and "chars " in out
    assert main(["summarize", str(path), "--words", "80", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "narrative" and report["words"] <= 80 and report["model_calls"] == 0
    for sentence in report["sentences"][1:]:
        assert supported(sentence["text"], story(), [tuple(s) for s in sentence["spans"]])
    assert report == {**json.loads(json.dumps(summarize(story(), None, SummarySettings(words=80)).to_dict())),
                      "document": str(path), "seconds": report["seconds"]}  # fmt: skip
    assert main(["summarize", str(path), "--words", "5"]) != 0
    assert "words must be in [40, 2000], got 5" in capsys.readouterr().err
