"""The blocking leak check on real notes: no blocks on words that are not identifiers."""

import orjson

from clinical_ml.leak_false_positives import COMMON_WORD_NAMES, measure, with_common_word_names
from tests.conftest import TEST_KEY, shared_sample


def test_real_notes_as_exported_raise_no_block():
    reading = measure(shared_sample("synthea-bulk-10p"), TEST_KEY)
    assert reading.notes == 1215
    assert reading.blocks == 0, reading.findings


def test_patients_named_like_common_words_raise_no_block(tmp_path):
    renamed = with_common_word_names(shared_sample("synthea-bulk-10p"), tmp_path / "renamed")
    patients = [orjson.loads(line) for line in (renamed / "Patient.000.ndjson").read_bytes().splitlines()]
    assert {p["name"][0]["given"][0] for p in patients} <= set(COMMON_WORD_NAMES)
    reading = measure(renamed, TEST_KEY)
    # the earlier global-token rule would have blocked on these words in other patients' notes
    assert reading.global_token_hits > 0
    assert reading.blocks == 0, reading.findings
