"""The note scrubber measured on the planted-identifier corpus, through the pipeline's path."""

import pytest

from clinical_ml.deid_corpus import CATEGORIES, build_corpus, measure_recall, scrub_through_pipeline
from tests.conftest import TEST_KEY


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(400, seed=3)


@pytest.fixture(scope="module")
def scrubbed(corpus, tmp_path_factory):
    return scrub_through_pipeline(corpus, TEST_KEY, tmp_path_factory.mktemp("corpus"))


def test_every_category_is_planted_and_the_corpus_is_deterministic(corpus):
    assert {p.category for note in corpus for p in note.planted} == set(CATEGORIES) - {"photo"}
    again = build_corpus(400, seed=3)
    assert [n.text for n in again] == [n.text for n in corpus]
    assert build_corpus(5, seed=4)[0].text != corpus[0].text


def test_free_text_recall_is_at_least_99_percent_per_category_and_notes_stay_useful(corpus, scrubbed):
    notes, _ = scrubbed
    table, clinical_kept = measure_recall(corpus, notes)
    failing = table.filter(table["recall"] < 0.99)
    assert failing.is_empty(), failing.to_dicts()
    assert clinical_kept >= 0.95
    assert sum("denies" in text.lower() for text in notes.values()) > 0  # negations survive


def test_structured_fields_leak_nothing(scrubbed):
    _, leaks = scrubbed
    assert leaks == []  # 100% of the patients' identifiers gone from every de-identified table


def test_the_measure_sees_a_scrubber_that_removes_nothing(corpus):
    table, clinical_kept = measure_recall(corpus, {n.note_id: n.text for n in corpus})
    assert table["recall"].max() == 0.0 and clinical_kept == 1.0
    half = {n.note_id: n.text.replace(n.planted[0].value, "[X]") for n in corpus}
    partial, _ = measure_recall(corpus, half)
    assert 0 < partial["recall"].max() < 1
