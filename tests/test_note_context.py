"""The context classifier of condition mentions (clinical_ml.note_context): rules, the command
line, the batch and single-note paths, and accuracy floors on the annotated corpus."""

import csv
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from clinical_ml.note_context import CONDITIONS, Context, classify, classify_one, note_mentions_sql
from tests.conftest import shared_sample

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "note_context"
ATTRIBUTES = ("negated", "historical", "hypothetical", "experiencer")


def ctx(target: str, sentence: str) -> tuple:
    c = classify(duckdb.connect(), [(target, sentence)])[0]
    return int(c.negated), int(c.historical), int(c.hypothetical), c.experiencer


AFFIRMED = (0, 0, 0, "patient")
NEGATED = (1, 0, 0, "patient")
HISTORICAL = (0, 1, 0, "patient")
HYPOTHETICAL = (0, 0, 1, "patient")
FAMILY = (0, 0, 0, "other")


@pytest.mark.parametrize("target, sentence, expected", [
    ("hypertension", "No chest pain but has hypertension.", AFFIRMED),
    ("chest pain", "No chest pain but has hypertension.", NEGATED),
    ("abdominal pain", "Denies nausea, however endorses abdominal pain.", AFFIRMED),
    ("diabetes", "Denies fever; known diabetes on metformin.", AFFIRMED),
    ("cough", "Denies cough, which he had last month with bronchitis.", NEGATED),
    ("hypertension", "No significant past medical history aside from hypertension.", HISTORICAL),
    ("vomiting", "No abdominal pain. Vomiting since last night.", AFFIRMED),
])
def test_scopes_end_at_conjunctions_and_sentence_ends(target, sentence, expected):
    assert ctx(target, sentence) == expected


@pytest.mark.parametrize("target, sentence, expected", [
    ("Non-insulin dependent diabetes mellitus", "Non-insulin dependent diabetes mellitus, diet controlled.", AFFIRMED),
    ("diabetes mellitus", "Non-insulin dependent diabetes mellitus, diet controlled.", AFFIRMED),
    ("Nonproductive cough", "Nonproductive cough for two weeks.", AFFIRMED),
    ("non-small cell lung cancer", "Stage II non-small cell lung cancer.", AFFIRMED),
    ("smoker", "Lifelong non-smoker.", NEGATED),  # "non-" before the target is a cue; inside it, not
])
def test_a_cue_inside_the_target_does_not_apply_to_it(target, sentence, expected):
    assert ctx(target, sentence) == expected


def test_every_item_of_a_negated_list_is_negated():
    sentence = "Denies any recent fevers, weight loss, or night sweats, but does report fatigue."
    got = classify(duckdb.connect(), [(t, sentence) for t in ("fevers", "weight loss", "night sweats", "fatigue")])
    assert [c.negated for c in got] == [True, True, True, False]
    assert ctx("N/V", "no SOB no CP no N/V") == NEGATED
    assert ctx("kidney disease", "No diabetes, no hypertension, no kidney disease.") == NEGATED


@pytest.mark.parametrize("target, sentence, expected", [
    ("HTN", "Mother with HTN and DM2.", FAMILY),
    ("DM2", "Mother with HTN and DM2.", FAMILY),
    ("colon cancer", "Family history of colon cancer in maternal grandmother.", FAMILY),
    ("prostate cancer", "FHx: breast cancer (sister), prostate cancer (father).", FAMILY),
    ("colon cancer", "No family history of colon cancer.", (1, 0, 0, "other")),
    ("stroke", "Father had a stroke at age 60.", FAMILY),  # someone else's past is not the patient's history
    ("DM2", "Patient has DM2, and her mother had diabetes as well.", AFFIRMED),
    ("asthma", "Mother reports the patient has asthma.", AFFIRMED),  # the mother is the informant
    ("hypertension", "Patient lives with her mother; she has hypertension.", AFFIRMED),
    ("postpartum depression", "Mother of two, 6 weeks postpartum, with postpartum depression.", AFFIRMED),
])
def test_experiencer(target, sentence, expected):
    assert ctx(target, sentence) == expected


@pytest.mark.parametrize("target, sentence, expected", [
    ("hypertension", "History of hypertension for 15 years, currently well controlled.", HISTORICAL),
    ("CKD", "PMH: HTN, DM, CKD", HISTORICAL),
    ("Depression", "Past medical history: Obesity. Tobacco use. Depression.", HISTORICAL),  # header carries over
    ("myocardial infarction", "The patient had a myocardial infarction 3 years ago.", HISTORICAL),
    ("Pneumonia", "Pneumonia, resolved.", HISTORICAL),
    ("smoking", "Quit smoking 2 years ago.", HISTORICAL),
    ("smoker", "Current smoker, 1 ppd.", AFFIRMED),
    ("stroke", "No prior history of stroke.", NEGATED),  # nothing historical is asserted
    ("pneumonia", "Previously healthy 28-year-old now with pneumonia.", AFFIRMED),
    ("chest pain", "Chest pain began 2 hours prior to arrival.", AFFIRMED),
    ("left leg swelling", "History of DVT. Now with new left leg swelling.", AFFIRMED),
    ("fever", "She reports a 2-day history of fever.", AFFIRMED),
])
def test_history(target, sentence, expected):
    assert ctx(target, sentence) == expected


@pytest.mark.parametrize("target, sentence, expected", [
    ("pulmonary embolism", "Rule out pulmonary embolism with CT angiogram.", HYPOTHETICAL),
    ("chest pain", "Return to ED if chest pain returns or worsens.", HYPOTHETICAL),
    ("sepsis", "Concern for sepsis given hypotension.", HYPOTHETICAL),
    ("hypotension", "Concern for sepsis given hypotension.", AFFIRMED),
    ("type 2 diabetes", "At high risk for developing type 2 diabetes.", HYPOTHETICAL),
    ("breast cancer", "Mammogram ordered for breast cancer screening.", HYPOTHETICAL),
    ("CHF exacerbation", "Differential includes pneumonia vs CHF exacerbation.", HYPOTHETICAL),
    ("PE", "PE has not been ruled out; awaiting CTA.", HYPOTHETICAL),
    ("TIA", "Possible history of TIA in 2019.", (0, 1, 1, "patient")),
    ("pneumonia", "CXR consistent with pneumonia.", AFFIRMED),
])
def test_hypothetical(target, sentence, expected):
    assert ctx(target, sentence) == expected


@pytest.mark.parametrize("target, sentence", [
    ("hypertension", "No change in his hypertension regimen."),
    ("edema", "No increase in edema since the last visit."),
    ("fatigue", "Not only fatigue; he also reports chest pain."),
    ("urosepsis", "Blood cultures with gram negative rods; treating urosepsis."),
    ("breast cancer", "ER-positive, HER2-negative breast cancer."),
    ("hypertension", "Hypertension was never well controlled."),
    ("diabetes", "He is no longer taking metformin for his diabetes."),
])
def test_pseudo_negations_do_not_negate(target, sentence):
    assert ctx(target, sentence) == AFFIRMED


@pytest.mark.parametrize("target, sentence", [
    ("Pneumonia", "Pneumonia was ruled out; symptoms attributed to viral bronchitis."),
    ("Influenza", "Influenza PCR negative."),
    ("Hypertension", "Hypertension: No"),
    ("Chest pain", "Chest pain - none."),
    ("DVT", "DVT is not present on today's ultrasound."),
    ("PE", "CTA ruled out PE."),
])
def test_backward_cues(target, sentence):
    assert ctx(target, sentence) == NEGATED


def test_a_backward_cue_does_not_reach_past_a_terminator_or_far_away():
    assert ctx("depressed mood", "Psych: positive for depressed mood, negative for anxiety.") == AFFIRMED
    assert ctx("wheezing", "Lungs clear without wheezing, which suggests the asthma exacerbation has resolved.") == NEGATED


def test_the_command_line_contract():
    lines = [
        "fever\tNo fever, chills, or night sweats.",
        "this line has no tab",
        "\tan empty target",
        "hypertension\tNo chest pain but has hypertension.",
        "PE\ta sentence without it",
        "HTN\tMother with HTN.\r",
        "a\tb\tc",
        "smoking\tQuit smoking in 2010.",
    ]
    data = ("\n".join(lines) + "\n").encode() + b"stroke\tNo \xff stroke\n"
    done = subprocess.run([sys.executable, "-m", "clinical_ml.note_context"], input=data, capture_output=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0
    out = done.stdout.decode().split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines) + 1  # one output line per input line, aligned
    assert out[:-1] == ["1\t0\t0\tpatient", "\t\t\t", "\t\t\t", "0\t0\t0\tpatient", "\t\t\t", "0\t0\t0\tother",
                        "\t\t\t", "0\t1\t0\tpatient", "\t\t\t"]
    errors = done.stderr.decode().splitlines()
    assert [e.split(":")[0] for e in errors] == ["line 2", "line 3", "line 5", "line 7", "line 9"]
    assert "tab" in errors[0] and "empty target" in errors[1] and "does not occur" in errors[2]
    assert "UTF-8" in errors[4]


def read_corpus(split: str) -> list[dict]:
    with open(CORPUS / f"{split}.tsv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_the_single_note_path_is_the_batch_path():
    rows = read_corpus("dev")[::20]
    batch = classify(duckdb.connect(), [(r["target"], r["sentence"]) for r in rows])
    assert batch == [classify_one(r["target"], r["sentence"]) for r in rows]


def test_notes_are_classified_like_sentences():
    """The feature pipeline's path (terms found in whole notes) gives the same context as the
    (target, sentence) path."""
    sentences = ["No chest pain but has hypertension.", "Mother with HTN and DM2.", "Quit smoking 2 years ago.",
                 "Past medical history: Obesity. Tobacco use. Depression.", "Checking A1c to screen for diabetes.",
                 "PMH negative for CKD.", "Hypercholesterolemia: No"]
    con = duckdb.connect()
    con.execute("CREATE TABLE notes AS SELECT unnest(?::VARCHAR[]) AS text, "
                "generate_subscripts(?::VARCHAR[], 1)::VARCHAR AS note_id", [sentences, sentences])
    found = con.execute(f"""SELECT note_id::INTEGER, condition, target, negated, historical, hypothetical, experiencer
                            FROM ({note_mentions_sql('notes')}) ORDER BY 1, mention_no""").fetchall()
    assert {c for _, c, *_ in found} == set(CONDITIONS)
    pairs = [(target, sentences[n - 1]) for n, _, target, *_ in found]
    assert [Context(*row[3:]) for row in found] == classify(con, pairs)


def f1_scores(split: str) -> dict[str, float]:
    rows = read_corpus(split)
    got = classify(duckdb.connect(), [(r["target"], r["sentence"]) for r in rows])
    scores = {}
    for a in ATTRIBUTES:
        gold = [r[a] in ("1", "other") for r in rows]
        predicted = [getattr(c, a) in (True, "other") for c in got]
        tp = sum(g and p for g, p in zip(gold, predicted))
        precision, recall = tp / max(sum(predicted), 1), tp / max(sum(gold), 1)
        scores[a] = 2 * precision * recall / (precision + recall) if tp else 0.0
    return scores


# Floors a little under the measured F1 (benchmarks/results/note_context.txt). The rules were
# written on dev; heldout was scored once (0.934 / 0.966 / 0.959 / 0.902), then its misses were
# read and it served as development data too; heldout2, by another author, was unseen until it
# was scored once after that revision (0.972 / 0.924 / 0.884 / 0.949) and is not tuned on.
@pytest.mark.parametrize("split, floors", [
    ("dev", {"negated": 0.98, "historical": 0.97, "hypothetical": 0.98, "experiencer": 0.97}),
    ("heldout", {"negated": 0.98, "historical": 0.97, "hypothetical": 0.95, "experiencer": 0.97}),
    ("heldout2", {"negated": 0.96, "historical": 0.91, "hypothetical": 0.87, "experiencer": 0.93}),
])
def test_accuracy_floors_on_the_annotated_corpus(split, floors):
    scores = f1_scores(split)
    assert {a: round(scores[a], 3) for a in ATTRIBUTES if scores[a] < floors[a]} == {}


def test_real_synthea_notes_are_classified():
    sample = shared_sample("synthea-bulk-10p")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "note_context_real_notes.py"), str(sample)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in done.stdout.splitlines()
            if line.split() and line.split()[0] in CONDITIONS}
    assert set(rows) == set(CONDITIONS)
    mentions, _notes, affirmed, negated, historical, _hypothetical, _other = map(sum, zip(*rows.values()))
    assert mentions > 1000 and affirmed > 0 and negated > 0 and historical > 0
    # "Patient has never smoked." and "Patient quit smoking at age 16." are the sample's smoking lines
    assert rows["smoking"][3] > 0 and rows["smoking"][4] > 0 and rows["smoking"][2] == 0


@pytest.mark.parametrize("target, sentence, expected", [
    ("fever", "ROS: (+) fatigue, (-) fever, (-) chills", NEGATED),
    ("fatigue", "ROS: (+) fatigue, (-) fever, (-) chills", AFFIRMED),
    ("nausea", "Negative ROS for fever, chills, nausea.", NEGATED),
    ("Chest pain", "Chest pain is denied.", NEGATED),
    ("Diabetes", "Diabetes - patient denies.", NEGATED),
    ("cough", "Fever - no, cough - yes.", AFFIRMED),  # the "no" answers fever, not cough
    ("Hypertension", "Hypertension: no change, continue current meds.", AFFIRMED),
    ("anemia", "No clear cause for her anemia identified.", AFFIRMED),
    ("hypertension", "Not currently on medication for hypertension.", AFFIRMED),
    ("Cellulitis", "Cellulitis was considered but ruled out.", NEGATED),
])
def test_template_answers_signs_and_passive_denials(target, sentence, expected):
    assert ctx(target, sentence) == expected


@pytest.mark.parametrize("target, sentence, expected", [
    ("sickle cell disease", "Family history positive for sickle cell disease.", FAMILY),
    ("vomiting", "His girlfriend had similar symptoms of vomiting last week.", FAMILY),
    ("high fevers", "Her mother brought her in because of high fevers.", AFFIRMED),
    ("hypertension", "The patient, like his father, has hypertension.", AFFIRMED),
    ("appendicitis", "? early appendicitis, surgery consulted", HYPOTHETICAL),
])
def test_experiencer_and_question_forms(target, sentence, expected):
    assert ctx(target, sentence) == expected
