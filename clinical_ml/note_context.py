"""Context of condition mentions in clinical text (ConText-style): is a mention negated,
historical, hypothetical, and whose is it (the patient's or someone else's)?

One mention is (text before it, the target phrase, text after it). The classification is one
DuckDB statement over any number of mentions (``context_sql``): the batch pipeline runs it over
every note at once, and a single sentence at serving time goes through the same statement on an
in-memory connection (``classify``, ``classify_one``).

How it works, in SQL string functions (RE2), per mention:

1. The text before and after the target is lower-cased, so upper-case letters are free to serve
   as tags. Then, in a fixed order of priority, every cue phrase is replaced by one tag letter:
   pseudo-cues first (``no change in``, ``gram negative``: they neutralise the words inside
   them), then cues that must win over a shorter one (``cannot be excluded`` before
   ``excluded``), then the attribute cues, then scope terminators. The target itself is never
   tagged, so a cue inside it ("non-insulin dependent diabetes") does not apply to it.
2. A forward cue applies when it occurs before the target with no terminator of its attribute
   between them (``[N][^T…]*$`` on the text before); a backward cue when it occurs after the
   target, within a few words and before any terminator (``^[^T…]{0,w}[M]``). Sentence ends,
   ``but``, ``however``, ``which``, ``presents with``… terminate scopes; some terminators end
   only some attributes (``aside from`` ends a negation, not a history list).
3. A coordinated list stays in scope ("no fever, chills, or night sweats"): commas and ``or``
   are not terminators.
4. Conventions of the annotation guidelines (tests/data/note_context/README.md): a negated
   mention asserts no history and no hypothesis; a mention about someone else is never the
   patient's history; "Hx: X" section headers carry over sentence ends.

Cue lists live here, once (``CUES``); the naive baseline of the benchmark reads them too.
Condition terms of the model's note features live here too (``CONDITION_TERMS``).

Command line: ``python -m clinical_ml.note_context < pairs.tsv`` reads ``target<TAB>sentence``
lines and writes ``negated<TAB>historical<TAB>hypothetical<TAB>experiencer`` for each (0/1,
0/1, 0/1, ``patient``/``other``). A malformed line (no tab or more than one, empty target,
target not in the sentence, not UTF-8) gets a message with its line number on stderr and an
output line of four empty fields (three tabs), so output line N always answers input line N.
The first occurrence (case-insensitive) of a target that occurs more than once is classified.
Exit code 0, unless standard input cannot be read (2).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Iterable

import duckdb

from clinical_ml.db import quote_ident

ATTRIBUTES = ("negated", "historical", "hypothetical", "experiencer")

# Context kept around a mention in a note: scopes end at sentence ends anyway, and a bounded
# window keeps the regex work per mention constant on long notes.
WINDOW_CHARS = 1000

_FAMILY = (r"mother|mom|father|dad|girlfriend|boyfriend|fianc[eé]e?|friends?|kids|children|classmates|sisters?|brothers?|siblings?|parents?|grandmother|grandfather|grandparents?"
           r"|grandson|granddaughter|grandchild|aunt|uncle|cousins?|sons?|daughters?|twin|wife|husband|spouse"
           r"|partner|roommate|co-?workers?|relatives?|family members?")
_YEAR = r"(?:19|20)\d\d"


def _words(*phrases: str) -> str:
    """An alternation of regex phrases between word boundaries, longest first (RE2 takes the
    first alternative that matches at a position)."""
    return r"\b(?:" + "|".join(sorted(phrases, key=len, reverse=True)) + r")\b"


# Phrases that contain a cue word but do not negate, date or hedge anything.
_PSEUDO = _words(
    r"no (?:significant |interval |further |acute )?(?:change|increase|decrease|worsening|improvement|relief|response)"
    r"(?: in| of| to| with)?",
    r"not (?:improving|improved|relieved|responding|responsive|at goal|(?:well |adequately )?controlled|gone"
    r"|as bad|only|just|necessarily|uncommon|otherwise specified|in labor force|able to|tolerating)",
    r"never (?:well |adequately )?controlled", r"no longer (?:taking|on|using)",
    r"denies (?:any )?(?:improvement|change|worsening) (?:in|of)",
    r"without difficulty", r"gram[- ]negative", r"[a-z0-9]+-negative", r"intimate partner",
    r"history of (?:the )?present illness", r"present illness", r"social (?:history|hx)",
    r"(?:history|hx) (?:is |was )?(?:obtained|provided|limited|taken|given|per|from|by)",
    r"gives a (?:history|hx) of", r"\d+[- ]?(?:hours?|hrs?|days?|weeks?|wks?)[- ](?:history|hx) of",
    r"prior to (?:arrival|admission|presentation|transfer|discharge|surgery|procedure)",
    r"previously (?:healthy|well)", r"(?:unchanged|compared) (?:from|with|to) prior",
    r"prior (?:appointment|visit|echo|imaging|films?|studies|study|exam|ct|cxr|mri|ekg|ecg)",
    r"\d+[- ]?(?:years?|yrs?|y|months?|mos?|weeks?|wks?|days?)[- ]old", r"year-old",
    r"(?:trying|wants?|wanting|plans?|planning|ready|advised|counseled|encouraged|motivated) to quit",
    r"(?:brought|accompanied|driven|referred|sent) (?:in )?by (?:his |her |the )?(?:" + _FAMILY + r")",
    r"(?:mother|father) of (?:\w+)", r"lives with (?:his |her )?(?:" + _FAMILY + r")",
    r"per (?:his |her |the )?(?:" + _FAMILY + r")", r"like (?:his |her )(?:" + _FAMILY + r")",
    r"quit (?:his |her |their )?(?:job|work|school|team)",
    r"no (?:clear |obvious |definite |definitive |identifiable |known )?(?:cause|etiology|source|trigger|explanation)"
    r" (?:for|of)",
    r"no (?:current |further )?(?:treatment|therapy|medications?|meds) (?:for|of)",
    r"not (?:currently |yet )?(?:taking|on) (?:any )?(?:medications?|meds|treatment|therapy)(?: for)?",
    r"none since")


# Tags, applied in this order (earlier ones win the words they cover). Each entry: tag letter,
# what it means, which side of the target it is searched on ('pre', 'post' or 'both'), regex.
# Letters: X pseudo-cue (neutral); N/M/B negation forward/backward/both; H/I historical
# forward/backward; P/Q/V hypothetical forward/backward/both; E/F experiencer other
# forward/backward; T ends every scope; K ends negation, hypothesis and experiencer; A ends
# negation (an affirmation); R ends history; G ends hypothesis; S ends experiencer (the patient
# is the subject again).
CUES: list[tuple[str, str, str, str]] = [
    # --- anchored on the target: templates and prefixes ("Hypertension: No", "-cough", "non-smoker")
    ("X", "template answer that is a pseudo-cue ('Hypertension: no change')", "post",
     r"^\s*[:=\-–—]+\s*" + _PSEUDO),
    ("M", "template value after the target", "post",
     r"^\s*(?:history|hx|use)?\s*[:=\-–—?]+\s*(?:(?:patient|pt)\s+)?(?:no|n|none|neg|negative|denies|denied|absent"
     r"|not present|not appreciated|not seen|never)\b"),
    ("X", "another item's template answer before the target ('Fever - no, cough')", "pre",
     r"[:=\-–—?]\s*(?:no|none|neg|negative|denies|denied|absent)\s*[,;]"),
    ("N", "(-) before the target", "pre", r"\(\s*-\s*\)"),
    ("A", "(+) before the target", "pre", r"\(\s*\+\s*\)"),
    ("N", "minus or non- glued to the target", "pre", r"(?:^|\s)-$|\bnon-?$"),
    ("A", "plus sign before the target", "pre", r"(?:^|\s)\+\s?$"),
    ("P", "question mark before the target", "pre", r"\?\s*$"),
    ("Q", "question mark after the target", "post", r"^\s*\?"),
    ("F", "family member right after the target", "post",
     rf"^\s*,?\s*(?:\(\s*|in\s+|-\s*)(?:his\s+|her\s+|the\s+|both\s+)?(?:maternal\s+|paternal\s+)?(?:{_FAMILY})\b"),
    ("I", "'history' right after the target", "post", r"^\s*(?:history|hx)\b"),
    ("Q", "screening, prophylaxis... right after the target", "post",
     r"^\s*(?:screening|prophylaxis|prevention|risk|vaccines?|vaccination)\b"),
    ("I", "a year in parentheses after the target", "post", r"\(" + _YEAR + r"\)"),
    # --- pseudo-cues: contain a cue word but do not negate, date or hedge anything
    ("X", "pseudo-cue", "both", _PSEUDO),
    # --- hedges that contain a negation word, and probable negation: before the plain cues
    ("V", "not excluded (uncertain)", "both", _words(
        r"(?:has |have )?not (?:yet )?(?:been )?(?:ruled out|excluded)", r"cannot be (?:ruled out|excluded)",
        r"can ?not (?:rule out|exclude)", r"can't (?:rule out|exclude|be excluded)", r"could not (?:rule out|exclude)",
        r"not certain (?:whether|if)", r"unclear (?:whether|if)", r"not sure (?:whether|if)")),
    ("B", "probable negation", "both", _words(r"unlikely", r"low (?:suspicion|likelihood|probability) (?:for|of)",
                                              r"not consistent with", r"no longer (?:present|seen|visible|evident)")),
    # --- experiencer: someone else's condition
    ("E", "family member or other person", "pre", _words(
        r"family (?:history|hx)(?: of| (?:is )?(?:positive|significant|notable|remarkable) for)?", r"fhx", r"fh", r"family members?", _FAMILY, r"maternal", r"paternal",
        r"sick contacts?")),
    # --- negation
    ("N", "negation before the target", "pre", _words(
        r"no", r"not", r"denies", r"denied", r"deny", r"denying", r"without", r"w/o", r"negative for", r"neg for",
        r"free of", r"absence of", r"never", r"neither", r"nor", r"ruled out", r"fails to reveal",
        r"neg(?:ative)? (?:ros|review of systems|work-?up|screen|screening|testing|test|evaluation) for",
        r"no evidence of", r"no signs? of", r"no s/s of", r"\w+n't", r"unremarkable for", r"no h/o")),
    ("N", "'negative for' after the target is a forward cue, not 'negative'", "post", _words(r"negative for", r"neg for")),
    ("M", "negation after the target", "post", _words(
        r"(?:was |were |is |are |been |effectively )?(?:ruled out|excluded)", r"(?:is |are |was |were )?not present",
        r"(?:is |are |was |were )?denied", r"(?:was |were )?considered,? but (?:was |were )?(?:ruled out|excluded)",
        r"(?:is |are |was |were )?absent", r"not appreciated", r"not seen", r"not identified", r"not detected",
        r"not found", r"negative", r"none")),
    # --- history
    ("H", "history before the target", "pre", _words(
        r"history of", r"hx of", r"h/o", r"hx", r"pmh", r"pmhx", r"psh", r"past medical history", r"medical history",
        r"past history", r"surgical history", r"s/p", r"status post", r"prior", r"previous",
        r"previously", r"former", r"formerly", r"ex-", r"quit", r"remote", r"old", r"interval resolution of",
        r"in " + _YEAR, r"last (?:month|year|winter|spring|summer|fall|autumn)", r"(?:months|years|decades) ago",
        r"as a (?:child|teen|teenager|kid)", r"in (?:his|her) (?:childhood|youth|teens|\d0s)", r"childhood")
     # "cancer history: ..." ("social history:" and "family history:" were taken above)
     + r"|\b[a-z]+ (?:history|hx)\s*:"),
    ("I", "history after the target", "post", _words(
        r"(?:has |had |have )?(?:since |now |completely |spontaneously )?resolved", r"in remission",
        r"in " + _YEAR, r"(?:\d+|several|many|few) (?:months|years|decades) ago",
        r"years ago", r"(?:as a|in) (?:child|childhood|teen|teenager|kid|youth)", r"in (?:college|high school|the military)", r"in (?:his|her) (?:teens|\d0s)",
        r"at age \d+", r"during (?:her |his )?(?:\w+ )?pregnancy", r"quit", r"last (?:month|year|winter|spring|summer|fall)")),
    # --- hypothetical: possible, planned work-up, risk and prevention, conditional
    ("P", "hypothetical before the target", "pre", _words(
        r"possible", r"possibly", r"probable", r"probably", r"suspected", r"suspect", r"suspicion (?:for|of)",
        r"suspicious (?:for|of)", r"questionable", r"question of", r"may (?:have|represent|be)", r"might (?:have|be)",
        r"could (?:be|have|represent|lead to|cause)", r"can lead to", r"concern for", r"concerning for",
        r"worrisome for", r"rule out", r"rule-out", r"r/o", r"evaluate for", r"evaluation for", r"eval for",
        r"assess for", r"work-?up for", r"w/u for", r"screen for", r"screening(?: test)? for", r"screening",
        r"risk of", r"risk for", r"at risk", r"risk factors? for", r"prevent", r"prevention of", r"prophylaxis (?:for|against)",
        r"vaccin\w* (?:for|against)", r"if", r"unless", r"in the event of", r"in case of",
        r"should (?:he|she|they|there|you|the patient|patient)", r"return (?:to (?:the )?(?:ed|er|clinic) )?(?:if|for)",
        r"return precautions(?: given)?(?: for)?", r"call (?:\w+ )?(?:\w+ )?if", r"contact (?:md|doctor|physician|provider|us|clinic) (?:for|if)",
        r"warning signs of", r"educat\w* (?:on|about|regarding) (?:the )?(?:warning )?(?:signs|symptoms)", r"monitor\w* for", r"watch for", r"vigilance for",
        r"observe for", r"differential(?: diagnosis)?(?: includes?| of)?", r"ddx", r"thought to be", r"presumed",
        r"presumptive", r"consider", r"considering", r"uncertain", r"either")),
    ("Q", "hypothetical after the target", "post", _words(
        r"is possible", r"is suspected", r"suspected", r"questionable")),
    ("V", "alternatives", "both", _words(r"vs", r"vs\.", r"versus")),
    # --- scope terminators
    ("T", "ends every scope", "both", _words(
        r"but", r"however", r"although", r"though", r"which", r"whereas", r"presents? (?:with|after|for)", r"presenting (?:with|after|for)",
        r"is presenting with", r"presented with")),
    ("K", "ends negation, hypothesis and experiencer", "both", _words(
        r"except(?: for)?", r"aside from", r"apart from", r"other than", r"despite")),
    ("A", "affirmation: ends negation", "both", _words(
        r"reports?", r"reported", r"endorses", r"endorsed", r"admits?(?: to)?", r"complains? of", r"c/o",
        r"positive for", r"notes", r"noted to have", r"yes", r"y")),
    ("R", "ends history", "both", _words(r"now", r"residual", r"currently", r"new", r"today")),
    ("G", "ends hypothesis", "both", _words(
        r"given", r"due to", r"in the setting of", r"secondary to", r"as (?:the )?cause(?: of)?", r"cause of",
        r"includes?", r"continued", r"protocol", r"from", r"because of", r"with continued")),
    ("S", "the patient again: ends experiencer", "both", _words(
        r"patient'?s?", r"pt'?s?", r"(?:he|she) (?:himself|herself)", r"himself", r"herself", r"the child",
        r"the baby", r"the infant", r"reports?", r"states?", r"noticed", r"found", r"notes", r"and (?:she|he)",
        r"brought (?:him|her|the patient|pt)(?: in)?", r"(?:finding|found) (?:him|her)")),
]

# Per attribute: forward tags, backward tags, terminators, how far (characters of tagged text)
# a backward cue may be from the target.
SCOPES = {
    "negated": ("NB", "MB", "TKA", 30),
    "historical": ("H", "I", "TR", 60),
    "hypothetical": ("PV", "QV", "TKG", 40),
    # only adjacent backward cues ("colon cancer in father"): "DM2, and her mother had diabetes"
    # is the patient's DM2
    "experiencer": ("E", "F", "TKSA", 3),
}

# Sentence ends (a period followed by a space or the end, '!', ';', a line break) end every scope.
_BOUNDARY = r"[.!?]+(?:\s|$)|;|\n"
# Abbreviations whose period is not a sentence end.
_ABBREVIATION = r"\b(vs|dr|mrs?|ms|approx|etc|e\.g|i\.e)\."
# Section headers that carry over sentence ends ("Past medical history: Obesity. Tobacco use.").
_HISTORY_HEADER = (r"(?:past medical|past surgical|medical|surgical|past|cancer|pmh/psh)\s+(?:history|hx)|pmhx?|psh")
_FAMILY_HEADER = r"family\s+(?:history|hx)|fhx|fh"
_HEADER = rf"(?:^|[\n.;]\s*)({_HISTORY_HEADER}|{_FAMILY_HEADER})\s*:[^:]*$"

# Condition terms of the model's note features (lower case). A decoy ("prediabetes") is
# matched so that the term inside it is not.
CONDITION_TERMS = {
    "htn": [r"hypertension", r"hypertensive", r"htn", r"high blood pressure", r"elevated blood pressure", r"high bp",
            r"elevated bp"],
    "diabetes": [r"(?:type\s*(?:1|2|i|ii|one|two)\s+)?diabetes(?:\s+mellitus)?(?:,?\s+type\s*(?:1|2|i|ii))?",
                 r"diabetic", r"t[12]dm", r"dm\s?(?:type\s?)?(?:1|2|i|ii)?", r"niddm", r"iddm", r"(?:type\s?[12]|t[12])\s?dm",
                 r"(?:non-?)?insulin[- ]dependent diabetes(?: mellitus)?"],
    "ckd": [r"chronic kidney disease(?:,?\s+stage\s*\d\w?)?", r"kidney disease", r"renal disease", r"ckd(?:\s*(?:stage\s*)?\d)?",
            r"esrd", r"end[- ]stage renal disease", r"end[- ]stage kidney disease", r"renal insufficiency", r"renal failure",
            r"kidney failure", r"diabetic nephropathy", r"nephropathy"],
    "obesity": [r"(?:morbid|severe)(?:ly)? obes(?:e|ity)", r"obesity", r"obese"],
    "smoking": [r"smokers?", r"smoking", r"smokes", r"smoked", r"tobacco use", r"tobacco", r"cigarettes?"],
    "hyperlipidemia": [r"hyperlipid(?:a)?emia", r"hypercholesterol(?:a)?emia", r"dyslipid(?:a)?emia",
                       r"hypertriglycerid(?:a)?emia", r"high cholesterol", r"elevated cholesterol", r"hld"],
}
_DECOYS = [r"pre-?diabet\w*", r"pre-?hypertensi\w*", r"diabetes insipidus", r"anti-?hypertensi\w*",
           r"passive smok\w*", r"second-?hand smok\w*"]
CONDITIONS = tuple(CONDITION_TERMS)


@dataclass(frozen=True)
class Context:
    negated: bool
    historical: bool
    hypothetical: bool
    experiencer: str  # 'patient' or 'other'

    def as_tsv(self) -> str:
        return f"{int(self.negated)}\t{int(self.historical)}\t{int(self.hypothetical)}\t{self.experiencer}"


def _sql_string(value: str) -> str:
    """A constant regex of this module as a SQL literal (our own patterns, not user input)."""
    return "'" + value.replace("'", "''") + "'"


def _tagged(column: str, side: str) -> str:
    """SQL: ``column`` (lower-cased text on one side of the target) with cues replaced by tags."""
    expr = f"regexp_replace({column}, {_sql_string(_ABBREVIATION)}, '\\1', 'g')"
    if side == "pre":  # a question mark opening the text asks about what follows ("? early appendicitis")
        expr = f"regexp_replace({expr}, '^\\s*\\?+\\s*', ' P ')"
    expr = f"regexp_replace({expr}, {_sql_string(_BOUNDARY)}, ' T ', 'g')"
    for tag, _meaning, where, pattern in CUES:
        if where in (side, "both"):
            expr = f"regexp_replace({expr}, {_sql_string(pattern)}, ' {tag} ', 'g')"
    return expr


def _scope(attribute: str) -> tuple[str, str]:
    forward, backward, terminators, reach = SCOPES[attribute]
    before = f"[{forward}][^{terminators}]*$"
    after = f"^[^{terminators}]{{0,{reach}}}[{backward}]"
    return before, after


def context_sql(source: str) -> str:
    """SQL: the context of every mention in relation ``source`` (columns ``mention_id``, ``pre``:
    text before the target, ``post``: text after it). Yields ``mention_id, negated,
    historical, hypothetical, experiencer`` (booleans and 'patient'/'other')."""
    hits = {}
    for attribute in ATTRIBUTES:
        before, after = _scope(attribute)
        hits[attribute] = (f"(regexp_matches(pre_t, {_sql_string(before)}) "
                           f"OR regexp_matches(post_t, {_sql_string(after)}))")
    return f"""
    SELECT mention_id,
           negated,
           (hit_historical OR header = 'history') AND NOT negated AND NOT other AS historical,
           hit_hypothetical AND NOT negated AS hypothetical,
           CASE WHEN other THEN 'other' ELSE 'patient' END AS experiencer
    FROM (
        SELECT mention_id, header,
               {hits['negated']} AS negated,
               {hits['historical']} AS hit_historical,
               {hits['hypothetical']} AS hit_hypothetical,
               {hits['experiencer']} OR header = 'family' AS other
        FROM (
            SELECT mention_id,
                   {_tagged('pre_l', 'pre')} AS pre_t,
                   {_tagged('post_l', 'post')} AS post_t,
                   CASE WHEN regexp_matches(header_l, {_sql_string(_FAMILY_HEADER)}) THEN 'family'
                        WHEN header_l <> '' THEN 'history' ELSE '' END AS header
            FROM (
                SELECT mention_id, lower(pre) AS pre_l, lower(post) AS post_l,
                       regexp_extract(lower(pre), {_sql_string(_HEADER)}, 1) AS header_l
                FROM {quote_ident(source)}
            )
        )
    )"""


def _pairs_sql() -> str:
    """SQL over parameters $targets, $sentences (VARCHAR[]): one mention per pair, located at the
    first case-insensitive occurrence of the target (NULL pre/post when it is not there)."""
    return """
    SELECT i AS mention_id,
           CASE WHEN p > 0 THEN left(s, p - 1) END AS pre,
           CASE WHEN p > 0 THEN s[p + length(t):] END AS post
    FROM (SELECT i, t, s, strpos(lower(s), lower(t)) AS p
          FROM (SELECT unnest($targets::VARCHAR[]) AS t, unnest($sentences::VARCHAR[]) AS s,
                       generate_subscripts($targets::VARCHAR[], 1) AS i))"""


def classify(con: duckdb.DuckDBPyConnection, pairs: Iterable[tuple[str, str]]) -> list[Context]:
    """The context of each (target, sentence) pair, in order, in one statement. Every target
    must occur in its sentence (``ValueError`` otherwise)."""
    pairs = list(pairs)
    if not pairs:
        return []
    for n, (target, sentence) in enumerate(pairs, 1):
        if not target.strip() or target.lower() not in sentence.lower():
            raise ValueError(f"pair {n}: target {target!r} is not in its sentence")
    rows = con.execute(
        f"WITH mention_spans AS ({_pairs_sql()}), ctx AS ({context_sql('mention_spans')}) "
        "SELECT negated, historical, hypothetical, experiencer FROM ctx ORDER BY mention_id",
        {"targets": [t for t, _ in pairs], "sentences": [s for _, s in pairs]}).fetchall()
    return [Context(*row) for row in rows]


def classify_one(target: str, sentence: str) -> Context:
    """One mention, for a caller with no connection at hand (the serving path)."""
    with duckdb.connect() as con:
        return classify(con, [(target, sentence)])[0]


def _terms_regex() -> str:
    alternatives = [t for terms in CONDITION_TERMS.values() for t in terms] + _DECOYS
    return _words(*alternatives)


def note_mentions_sql(notes: str) -> str:
    """SQL: every condition mention in relation ``notes`` (columns ``note_id``, ``text``) with its
    context: ``note_id, mention_no`` (order in the note), ``condition, target, negated,
    historical, hypothetical, experiencer``, one row per mention. Terms are found in lower-cased text; the context is the ``WINDOW_CHARS``
    around each mention."""
    terms = _sql_string(_terms_regex())
    condition_of = " ".join(f"WHEN regexp_full_match(hit, {_sql_string(_words(*t))}) THEN '{c}'"
                            for c, t in CONDITION_TERMS.items())
    return f"""
    WITH note_pieces AS (
        -- the text between matches and the matches, in order: piece k precedes hit k
        SELECT note_id, t, unnest(string_split_regex(t, {terms})) AS piece,
               unnest(regexp_extract_all(t, {terms})) AS hit,
               generate_subscripts(string_split_regex(t, {terms}), 1) AS k
        FROM (SELECT note_id, lower(text) AS t FROM {quote_ident(notes)} WHERE text IS NOT NULL)
    ),
    note_hits AS (
        SELECT note_id, t, k, hit,
               sum(length(piece) + coalesce(length(hit), 0)) OVER (PARTITION BY note_id ORDER BY k)
                 - length(hit) AS stop_before
        FROM note_pieces
    ),
    note_spans AS (
        SELECT note_id || ':' || k AS mention_id, note_id, k AS mention_no, hit AS target,
               CASE {condition_of} END AS condition,
               t[greatest(stop_before - {WINDOW_CHARS}, 0) + 1:stop_before] AS pre,
               t[stop_before + length(hit) + 1:stop_before + length(hit) + {WINDOW_CHARS}] AS post
        FROM note_hits WHERE hit IS NOT NULL
    ),
    note_ctx AS ({context_sql('note_spans')})
    SELECT s.note_id, s.mention_no, s.condition, s.target, c.negated, c.historical, c.hypothetical, c.experiencer
    FROM note_spans s JOIN note_ctx c USING (mention_id)
    WHERE s.condition IS NOT NULL"""


def _parse(line: str) -> tuple[str, str] | str:
    """(target, sentence), or why the line is malformed."""
    fields = line.split("\t")
    if len(fields) != 2:
        return f"expected 'target<TAB>sentence' (one tab), found {len(fields) - 1} tabs"
    target, sentence = fields
    if not target.strip():
        return "empty target"
    if target.lower() not in sentence.lower():
        return f"target {target!r} does not occur in the sentence"
    return target, sentence


def main(stdin=None, stdout=None, stderr=None, chunk: int = 5000) -> int:
    """The command-line contract (see the module docstring)."""
    stdin = stdin or sys.stdin.buffer
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    con = duckdb.connect()
    batch: list[tuple[int, tuple[str, str] | None]] = []

    def flush() -> None:
        valid = [pair for _, pair in batch if pair is not None]
        results = iter(classify(con, valid))
        for _, pair in batch:
            stdout.write((next(results).as_tsv() if pair is not None else "\t\t\t") + "\n")
        stdout.flush()
        batch.clear()

    try:
        for number, raw in enumerate(stdin, 1):
            try:
                line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError:
                parsed = "not valid UTF-8"
            else:
                parsed = _parse(line.rstrip("\r\n"))
            if isinstance(parsed, str):
                stderr.write(f"line {number}: {parsed}; wrote an empty line of four fields\n")
                batch.append((number, None))
            else:
                batch.append((number, parsed))
            if len(batch) >= chunk:
                flush()
    except OSError as err:
        flush()
        stderr.write(f"cannot read standard input: {err}\n")
        return 2
    flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
