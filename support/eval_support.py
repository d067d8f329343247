"""Support module for evaluate.py (not part of the method's reading path).

What lives here is needed to run the evaluation but says nothing about AZeroS itself:
  1. answer parsing: zero-shot answers -> an option letter (`parse_option`) or a label
     (`match_label`);
  2. label vocabularies and questions for the `label` task;
  3. task-file readers (mcq, open, choice rows -> `Item`s), errors naming file and line;
  4. resumable answer files: one JSON line per (id, system), appended per batch through files.py;
  5. scores of generated answers: parsed option or label -> accuracy per group; AUC;
  6. per-group rows, result tables (Markdown and JSON), the judge file of the `open` task.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from support import checks, files, labels
from support.checks import CheckError
from support.manifest import Record, read_manifest

# The paper's fixed option prompt, appended to every multiple-choice question (AIR-Bench style).
OPTION_PROMPT = "Please make your choice among A/B/C/D and do not output other texts."
LETTERS = "ABCDEFGHIJ"

# --------------------------------------------------------------------------------------------------
# 1. Multiple-choice answers -> option letter
#
# A zero-shot LLM does not always obey "answer with a letter": it writes "B", "(B)", "Answer: B",
# "B. happy", "The speaker sounds happy." or "A or B". Counting those as wrong would measure
# instruction following, not hearing, so the parser accepts every unambiguous form and returns None
# only when it cannot tell.


def _norm(text: str) -> str:
    """Lower-case, unify quotes/dashes/whitespace: the form in which choice texts are compared."""
    text = text.lower().replace("\u2019", "'").replace("\u2013", "-").replace("\u2014", "-")
    return re.sub(r"\s+", " ", text).strip(" \t\n.,;:!?\"'")


def _phrase_spans(text: str, phrase: str) -> list[tuple[int, int]]:
    """Where `phrase` occurs in `text` as whole words ("male" is not inside "female")."""
    if not phrase:
        return []
    pattern = r"(?<![a-z0-9])" + re.escape(phrase) + r"(?![a-z0-9])"
    return [m.span() for m in re.finditer(pattern, text)]


def match_phrases(text: str, surfaces: dict[str, str]) -> set[str]:
    """The labels whose surface forms occur in `text`, ignoring matches inside a longer match.

    surfaces maps a phrase to its label. "middle-age adult" must not also count as "adult", so a
    match whose span lies inside another match's span is dropped before the labels are collected.
    """
    text = _norm(text)
    hits = [(s, e, label) for phrase, label in surfaces.items()
            for s, e in _phrase_spans(text, _norm(phrase))]
    return {label for s, e, label in hits
            if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in hits)}


_KEYWORD = r"(?:answer|option|choice|choose|答案|选项|选择|选)"
_KEYWORD_BEFORE = _KEYWORD + r"\s*(?:is|would be|should be|will be|[:：是为])?\s*[\(\[]?\s*$"
_ARTICLE_FOLLOWERS = {"or", "and", "nor"}  # "A or B" names two options, "A male voice" names none


def _letter_mentions(text: str, letters: str, choices: list[str]) -> tuple[set[str], set[str]]:
    """Single letters in `text` that name an option -> (strong, weak) sets of upper-case letters.

    strong: "(B)", "[B]", "B." / "B)" / "B:" at the start, "answer: b", "选B";
    weak:   a lone capital letter anywhere ("I would pick C").
    A capital "A" followed by a word is the article ("A male voice"), unless that word starts the
    text of choice A itself ("A male" when A is "male") or is a conjunction ("A or B").
    """
    strong, weak = set(), set()
    for m in re.finditer(r"(?<![A-Za-z])([A-Za-z])(?![A-Za-z])", text):
        letter, s, e = m.group(1), m.start(), m.end()
        if letter.upper() not in letters:
            continue
        before, after = text[:s], text[e:]
        if re.search(r"[\(\[]\s*$", before) and re.match(r"\s*[\)\]]", after):
            strong.add(letter.upper())
        elif not before.strip() and re.match(r"\s*[.):：]", after):
            strong.add(letter.upper())
        elif re.search(_KEYWORD_BEFORE, before, re.I):
            if letter.islower() and re.match(r"\s+[a-z]", after):  # "the answer is a male speaker"
                continue
            strong.add(letter.upper())
        elif letter.isupper():
            word = re.match(r"\s+([A-Za-z][A-Za-z'-]*)", after)
            if letter == "A" and word and word.group(1).lower() not in _ARTICLE_FOLLOWERS:
                option_text = _norm(choices[letters.index(letter)])
                if option_text and _norm(after).startswith(option_text):
                    strong.add(letter)  # "A male" where choice A is "male"
                continue  # the article "A"
            weak.add(letter)
    return strong, weak


def parse_option(answer: str, choices: list[str]) -> str | None:
    """The option letter ("A", "B", ...) an answer picks, or None when it picks none or several.

    Order of evidence: a bare letter; explicit letter mentions (strong before weak); the text of
    exactly one choice ("The speaker sounds happy."). Mentions of two different letters are
    ambiguous -> None, without falling back to choice texts (the model hedged; it did not answer).
    """
    letters = LETTERS[: len(choices)]
    text = re.sub(r"[*_`#]", "", answer or "").replace("（", "(").replace("）", ")").strip()
    if not text:
        return None
    bare = text.strip(" \t\n.:)(][\"'")
    if len(bare) == 1 and bare.upper() in letters:
        return bare.upper()
    strong, weak = _letter_mentions(text, letters, choices)
    for mentions in (strong, weak):
        if len(mentions) == 1:
            return mentions.pop()
        if len(mentions) > 1:
            return None
    picked = match_phrases(text, {c: letters[i] for i, c in enumerate(choices)})
    return picked.pop() if len(picked) == 1 else None


# --------------------------------------------------------------------------------------------------
# 2. Label vocabularies for the `label` task
#
# The LLM answers in words, the manifest stores labels. Each label has a few surface forms ("woman"
# -> female, "anger" -> angry); an answer scores when its surface forms name exactly one label.

ATTRIBUTES = ("gender", "age", "emotion", "language")
# A reference value that is no label. Target generation drops exactly the official recipe's
# spellings (labels.UNKNOWN_VALUES) so the targets match the official ones; scoring also
# ignores a few more spellings of "no value": counting "none" as a wrong answer only adds noise.
UNKNOWN_VALUES = labels.UNKNOWN_VALUES | {"n/a", "none", "?"}
LANGUAGE_NAMES = {"en": "english", "zh": "chinese", "de": "german", "fr": "french",
                  "es": "spanish", "it": "italian", "ja": "japanese", "ko": "korean",
                  "ru": "russian", "pt": "portuguese", "ar": "arabic", "yue": "cantonese"}
# Synonym groups: every member maps to whichever member is a label of the vocabulary.
SYNONYMS = [
    ("male", "man", "men", "masculine", "boy", "guy", "gentleman"),
    ("female", "woman", "women", "feminine", "girl", "lady"),
    ("teenager", "teen", "teenage", "adolescent", "child", "kid", "youth"),
    ("young adult", "young", "young man", "young woman"),
    ("middle-age adult", "middle-aged", "middle aged", "middle age", "middle-aged adult"),
    ("senior", "elderly", "old", "older", "aged", "old man", "old woman"),
    ("happy", "happiness", "joy", "joyful", "glad", "cheerful", "excited", "pleased"),
    ("sad", "sadness", "unhappy", "sorrow", "sorrowful", "upset"),
    ("angry", "anger", "mad", "furious", "annoyed", "frustrated"),
    ("neutral", "neutrality", "no emotion", "emotionless"),
    ("fearful", "fear", "afraid", "scared", "frightened", "fearfulness"),
    ("disgust", "disgusted", "disgusting"),
    ("surprised", "surprise", "surprising", "amazed"),
    ("calm", "calmness", "relaxed"),
    ("contempt", "contemptuous"),
    ("en", "english"), ("zh", "chinese", "mandarin"), ("de", "german"), ("fr", "french"),
    ("es", "spanish"), ("it", "italian"), ("ja", "japanese"), ("ko", "korean"),
    ("ru", "russian"), ("pt", "portuguese"), ("ar", "arabic"), ("yue", "cantonese"),
]
LABEL_QUESTIONS = {"gender": "What is the gender of the speaker?",
                   "age": "What is the age group of the speaker?",
                   "emotion": "What emotion does the speaker express?",
                   "language": "Which language is the speaker speaking?"}


def surface_forms(vocab: list[str]) -> dict[str, str]:
    """Phrase -> label for a vocabulary. A synonym that is itself a label (RAVDESS has both "calm"
    and "neutral") stays that label; a language code ("en") is matched only through its name."""
    forms = {}
    for label in vocab:
        group = next((g for g in SYNONYMS if label in g), (label,))
        for phrase in group:
            if phrase in vocab and phrase != label:
                continue
            if phrase == label and label in LANGUAGE_NAMES:
                continue  # "it", "es", "en" are English words, not answers
            forms[phrase] = label
    return forms


def match_label(answer: str, vocab: list[str]) -> str | None:
    """The one label of `vocab` that `answer` names, or None (no label, or two different labels)."""
    if _norm(answer or "") in vocab:  # a bare label, including a bare language code ("en")
        return _norm(answer)
    found = match_phrases(answer or "", surface_forms(vocab))
    return found.pop() if len(found) == 1 else None


def age_label(value) -> str | None:
    """An age as target generation writes it into `<meta>` (labels.normalize_meta, the
    official age_to_group bands and quirks): numbers -> the four groups, names pass through."""
    return labels.normalize_meta({"age": value}).get("age")


def record_label(record: Record, attribute: str) -> str | None:
    """One attribute of a record, normalised like the training metadata; None if unknown."""
    value = record.language if attribute == "language" else record.meta.get(attribute)
    if value is None or str(value).strip().lower() in UNKNOWN_VALUES:
        return None
    if attribute == "age":
        return age_label(value)  # the raw value: a numeric 0 is no age, "0" is (official quirk)
    value = str(value).strip().lower()
    if attribute == "language":
        value = value.split("-")[0].split("_")[0]  # en-US -> en
    return value


def label_vocabularies(records: list[Record]) -> dict[str, list[str]]:
    """The closed label set per attribute. Gender and age have fixed sets; emotion and language take
    the labels present in the manifest (plus en/zh, AZeroS' two languages). An attribute with fewer
    than two labels is dropped: a one-option question measures nothing."""
    seen = defaultdict(set)
    for r in records:
        for a in ATTRIBUTES:
            if (label := record_label(r, a)) is not None:
                seen[a].add(label)
    vocab = {"gender": ["male", "female"], "age": list(labels.AGE_GROUPS),
             "emotion": sorted(seen["emotion"]),
             "language": sorted(seen["language"] | {"en", "zh"})}
    return {a: v for a, v in vocab.items() if seen[a] and len(v) >= 2}


def label_question(attribute: str, vocab: list[str]) -> str:
    """A zero-shot question whose options are the label vocabulary (languages by name)."""
    names = [LANGUAGE_NAMES.get(v, v).capitalize() if attribute == "language" else v
             for v in vocab]
    return f"{LABEL_QUESTIONS[attribute]} Answer with one of: {', '.join(names)}."


# --------------------------------------------------------------------------------------------------
# 3. Questions: one Item per (audio, question); every system answers every item


@dataclass
class Item:
    """One question about one clip. `record` carries the audio and the oracle text's ingredients
    (transcript, meta, language); `fields` the task's own columns (answer, choices, ...)."""
    id: str
    record: Record
    question: str
    fields: dict = field(default_factory=dict)


def read_rows(path) -> list[tuple[int, dict]]:
    """A task file's (line number, object) pairs. files.read_jsonl reads a missing file as empty
    (right for answer files); a missing task file is an error."""
    if not Path(path).exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    try:
        return files.read_jsonl(path)
    except ValueError as e:  # e.g. a comment line: one line naming it, not a traceback
        raise CheckError(f"{e}; a task file holds one JSON object per line (no comments)") from None


def _row_record(obj: dict, path, lineno: int) -> Record:
    """The audio part of a task row as a Record; `text`/`meta`/`language` feed the oracle."""
    if not isinstance(obj.get("audio"), str) or not obj["audio"]:
        raise CheckError(f"{path}:{lineno}: field 'audio' missing")
    audio = Path(os.path.expanduser(obj["audio"]))
    audio = audio if audio.is_absolute() else Path(path).resolve().parent / audio
    rid = str(obj.get("id", obj.get("uniq_id", f"line{lineno}")))
    return Record(id=rid, audio=str(audio), duration=float(obj.get("duration") or 0.0),
                  text=obj.get("text") or "", language=obj.get("language"),
                  offset=float(obj.get("offset") or 0.0), meta=dict(obj.get("meta") or {}),
                  source=f"{path}:{lineno}")


def mcq_question(question: str, choices: list[str]) -> str:
    """AIR-Bench Foundation layout: question, lettered options, and the paper's option prompt."""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n{options}\n{OPTION_PROMPT}"


def unique_ids(items: list[Item], path) -> list[Item]:
    """Answers are keyed by id (that is what makes resuming work): two rows must not share one."""
    seen = set()
    for it in items:
        if it.id in seen:
            raise CheckError(f"{it.record.source}: duplicate id {it.id!r} in {path}")
        seen.add(it.id)
    return items


def read_mcq(path) -> list[Item]:
    """Rows {audio, question, choices, answer[, task, id, text, meta]} -> Items.

    Also reads AIR-Bench's own columns (choice_a..choice_d, answer_gt, task_name, uniq_id).
    `answer` may be the letter or the text of the right choice.
    """
    items = []
    for lineno, obj in read_rows(path):
        choices = obj.get("choices") or [obj[k] for k in ("choice_a", "choice_b", "choice_c",
                                                          "choice_d") if obj.get(k)]
        answer = obj.get("answer", obj.get("answer_gt"))
        if not choices or answer is None or not obj.get("question"):
            raise CheckError(f"{path}:{lineno}: an mcq row needs question, choices and answer")
        choices = [str(c) for c in choices]
        letter = str(answer).strip().upper()
        if letter not in LETTERS[: len(choices)]:
            match = [i for i, c in enumerate(choices) if _norm(c) == _norm(str(answer))]
            if len(match) != 1:
                raise CheckError(f"{path}:{lineno}: answer {answer!r} is neither a letter nor "
                                 "one of the choices")
            letter = LETTERS[match[0]]
        rec = _row_record(obj, path, lineno)
        task = str(obj.get("task", obj.get("task_name", "all")))
        items.append(Item(rec.id, rec, mcq_question(obj["question"], choices),
                          {"task": task, "choices": choices, "answer": letter}))
    return unique_ids(items, path)


def read_open(path) -> list[Item]:
    """Rows {audio[, question, reference, task, id, text, meta]} -> Items. VoiceBench rows carry
    the question in the audio itself, so `question` may be missing: then the audio is the prompt."""
    items = []
    for lineno, obj in read_rows(path):
        rec = _row_record(obj, path, lineno)
        fields = {k: obj[k] for k in ("reference", "task") if obj.get(k) is not None}
        items.append(Item(rec.id, rec, str(obj.get("question") or ""), fields))
    return unique_ids(items, path)


def read_choice(path) -> list[Item]:
    """Rows {audio, question, choices, answer[, task, id, text, meta]} -> Items; `choices` are whole
    answers ("The speaker is a man."), `answer` is the index or the text of the right one."""
    items = []
    for lineno, obj in read_rows(path):
        choices, answer = obj.get("choices"), obj.get("answer")
        if (not obj.get("question") or not isinstance(choices, list) or len(choices) < 2
                or answer is None):
            raise CheckError(f"{path}:{lineno}: a choice row needs question, choices (a list of 2 "
                             "or more answers) and answer")
        choices = [str(c) for c in choices]
        if isinstance(answer, int) and not isinstance(answer, bool):
            if not 0 <= answer < len(choices):
                raise CheckError(f"{path}:{lineno}: answer index {answer} is out of range for "
                                 f"{len(choices)} choices")
            index = answer
        elif str(answer) in choices:
            index = choices.index(str(answer))
        else:
            raise CheckError(f"{path}:{lineno}: answer {answer!r} is neither an index nor one of "
                             "the choices")
        rec = _row_record(obj, path, lineno)
        items.append(Item(rec.id, rec, str(obj["question"]),
                          {"task": str(obj.get("task", "all")), "choices": choices,
                           "answer": index}))
    return unique_ids(items, path)


def label_items(records: list[Record]) -> list[Item]:
    """One question per record and known attribute, id "<record id>/<attribute>"."""
    vocabs = label_vocabularies(records)
    items = []
    for r in records:
        for attribute, vocab in vocabs.items():
            label = record_label(r, attribute)
            if label in vocab:
                items.append(Item(f"{r.id}/{attribute}", r, label_question(attribute, vocab),
                                  {"attribute": attribute, "label": label, "vocab": vocab}))
    return items


def task_audio(task: str, manifest) -> list[Record]:
    """The audio rows of a task file, for the checks evaluate.py runs before loading the model."""
    if task in ("align", "label"):
        return read_manifest(manifest)
    read = {"choice": read_choice, "mcq": read_mcq, "open": read_open}[task]
    return [it.record for it in read(manifest)]


# --------------------------------------------------------------------------------------------------
# 4. Resumable answer files: one JSON line per (id, system), appended after every batch


def load_done(path: Path, model_name: str) -> dict[tuple[str, str], dict]:
    """Rows already written by an earlier (interrupted) run, keyed by (id, system).

    files.read_jsonl(repair=True) cuts off the half line a crash can leave. Rows from another model
    are refused: mixing two models' answers in one table would be silent nonsense.
    """
    done = {}
    for lineno, row in files.read_jsonl(path, repair=True):
        if row.get("model") != model_name:
            raise CheckError(f"{path}:{lineno} holds answers of model {row.get('model')!r}, "
                             f"not {model_name!r}; use another --out")
        done[(row["id"], row["system"])] = row
    return done


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i: i + size]


def todo_items(items: list[Item], system: str, done: dict) -> list[Item]:
    """What is left for one system. The oracle skips rows without a transcript. Longest clips
    first, so similar lengths share a batch (less padding) and an out-of-memory shows up first."""
    left = [it for it in items if (it.id, system) not in done]
    if system == "oracle":
        left = [it for it in left if it.record.text]
    return sorted(left, key=lambda it: -it.record.duration)


def run_items(items: list[Item], path: Path, model_name: str, systems, batch_size: int,
              answer) -> dict:
    """Put every item to every system, appending each batch's rows; returns all rows by
    (id, system). `answer(chunk, system)` returns one dict of result fields per item (a generated
    response and its score, or the candidates' NLLs). One run at a time per answer file (a
    lock): two runs into one --out answered everything twice."""
    with checks.exclusive_lock(path):
        done = load_done(path, model_name)
        for system in systems:
            todo = todo_items(items, system, done)
            for chunk in tqdm(list(batches(todo, batch_size)), desc=system, unit="batch",
                              disable=not todo):
                rows = [{"id": it.id, "system": system, "model": model_name,
                         "question": it.question, **it.fields, **result}
                        for it, result in zip(chunk, answer(chunk, system))]
                files.append_jsonl(path, rows)
                done.update({(r["id"], r["system"]): r for r in rows})
    return done


# --------------------------------------------------------------------------------------------------
# 5. Scores of the generated answers


def score_mcq_row(fields: dict, response: str) -> dict:
    pred = parse_option(response, fields["choices"])
    return {"pred": pred, "correct": pred == fields["answer"]}


def score_label_row(fields: dict, response: str) -> dict:
    pred = match_label(response, fields["vocab"])
    return {"pred": pred, "correct": pred == fields["label"]}


def score_open_row(fields: dict, response: str) -> dict:
    return {}  # judged outside (the paper: GPT-4o)


def accuracy_table(rows: list[dict], group_key: str) -> dict:
    """Accuracy (%) per group and overall, with the count of answers the parser could not map
    (`unparsed`, counted wrong: a zero-shot model that does not answer did not get it right)."""
    def acc(rs):
        n, correct = len(rs), sum(r["correct"] for r in rs)
        return {"n": n, "correct": correct,
                "accuracy": 100.0 * correct / n if n else float("nan"),
                "unparsed": sum(r["pred"] is None for r in rs)}
    return {g: acc(rs) for g, rs in grouped(rows, group_key)}


def rescore(items: list[Item], done: dict, systems, score_row) -> dict[str, list[dict]]:
    """Rows of the current items per system, re-scored (a better parser applies to old answers)."""
    return {system: [{**row, **it.fields, **score_row(it.fields, row["response"])}
                     for it in items if (row := done.get((it.id, system))) is not None]
            for system in systems}


def auc(scores: list[float], positive: list[bool]) -> float:
    """Probability that a random positive row scores above a random negative one (ties count half):
    0.5 when the score ignores the class. NaN when a class is missing."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return float("nan")
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def summarize_open(rows: list[dict]) -> dict:
    words = [len(r["response"].split()) for r in rows]
    return {"n": len(rows), "empty": sum(w == 0 for w in words),
            "mean_words": sum(words) / len(words) if words else float("nan")}


# --------------------------------------------------------------------------------------------------
# 6. Tables and output files


def grouped(rows: list[dict], group_key: str) -> list[tuple[str, list[dict]]]:
    """(group, rows) pairs: one per value of row[group_key] in name order, then "all" with every
    row. Rows whose group is "all" (no task field) are counted once."""
    groups = defaultdict(list)
    for r in rows:
        groups["all"].append(r)
        if r[group_key] != "all":
            groups[r[group_key]].append(r)
    return sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0]))


def _fmt(x, digits=2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(task: str, results: dict) -> str:
    """The results as one Markdown table (rows: modes / task fields / attributes / systems)."""
    if task == "align":
        lines = ["| mode | n | tokens | CE audio | CE oracle text | CE silent | audio / text "
                 "| silent / text |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for mode, e in results["modes"].items():
            ce = e["ce"]
            lines.append(f"| {mode} | {e['n']} | {e['tokens']} | {_fmt(ce.get('audio'), 3)} | "
                         f"{_fmt(ce.get('oracle'), 3)} | {_fmt(ce.get('silent'), 3)} | "
                         f"{_fmt(e.get('ratio_audio'), 3)} | {_fmt(e.get('ratio_silent'), 3)} |")
        return "\n".join(lines) + "\n"
    systems = list(results["systems"])
    if task == "choice":
        lines = ["| task | system | n | accuracy % | AUC % | agrees with oracle % |",
                 "| --- | --- | ---: | ---: | ---: | ---: |"]
        for s, groups in results["systems"].items():
            for g, e in groups.items():
                lines.append(f"| {g} | {s} | {e['n']} | {_fmt(e['accuracy'], 1)} | "
                             f"{_fmt(e.get('auc'), 1)} | {_fmt(e.get('agrees_with_oracle'), 1)} |")
        return "\n".join(lines) + "\n"
    if task == "open":
        lines = ["| system | n | empty | mean words |", "| --- | ---: | ---: | ---: |"]
        for s, e in results["systems"].items():
            lines.append(f"| {s} | {e['n']} | {e['empty']} | {_fmt(e['mean_words'], 1)} |")
        return "\n".join(lines) + "\n"
    header = "task" if task == "mcq" else "attribute"
    groups = sorted({g for e in results["systems"].values() for g in e},
                    key=lambda g: (g == "all", g))
    lines = [f"| {header} | n | " + " | ".join(f"{s} acc % (unparsed)" for s in systems) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in systems) + " |"]
    for g in groups:
        cells, n = [], 0
        for s in systems:
            e = results["systems"][s].get(g)
            n = max(n, e["n"] if e else 0)
            cells.append(f"{_fmt(e['accuracy'], 1)} ({e['unparsed']})" if e else "-")
        lines.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def no_nan(x):
    """NaN (an empty group) -> null: json.dumps writes NaN, which strict JSON readers reject."""
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [no_nan(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def write_results(out: Path, task: str, results: dict) -> None:
    results = no_nan(results)
    files.write_atomic(out / f"{task}_results.json",
                       [json.dumps(results, indent=2, ensure_ascii=False) + "\n"])
    files.write_atomic(out / f"{task}_results.md", [markdown_table(task, results)])


def write_judge_file(path: Path, rows: list[dict]) -> None:
    """One system's open answers as judges read them (VoiceBench: prompt/response[/reference])."""
    def judge_row(r):
        row = {"id": r["id"], "prompt": r["question"], "response": r["response"]}
        return {**row, **{k: r[k] for k in ("reference", "task") if k in r}}
    files.write_atomic(path, [files.json_line(judge_row(r)) for r in rows])
