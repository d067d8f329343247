"""Evaluation: how text-like the audio looks to the frozen LLM, and zero-shot answers (AZeroS paper, Sec. 3.4
objective, Sec. 5.2 benchmarks, Sec. 5.5 text-only upper bound).

AZeroS trains only the projectors, with one objective (SIFT, Sec. 3.4, Eq. 2-3): the projected audio
h(x) should be indistinguishable, to the frozen LLM, from the oracle text embeddings of the same utterance
(its transcript, plus `<meta>` attributes in stage 2), measured as the cross-entropy of the target y that the
LLM itself generated from that text with no instruction. Evaluation therefore asks two kinds of question.

1. `align` -- the training objective itself, on held-out utterances. For every record with a
   self-generated target we compute the mean per-token cross-entropy of that target
       given the audio            (the speech LLM, the prompt it was trained with),
       given the oracle text      (the LLM's own input, from which the target was generated),
   and their ratio. A ratio of 1.0 means the audio is, to the LLM, as good as reading the text (feeding
   the oracle text embeddings in place of the audio gives exactly 1: `oracle_segments`, used by the tests).
   Reported per target-generation mode (sift_s, sift_sp, sit_sp, ...).
2. zero-shot tasks, never seen in training (Sec. 5.2: VoiceBench, AIR-Bench Foundation and Chat, with the
   text instruction appended after the audio):
   - `mcq`   AIR-Bench Foundation style multiple choice; the paper appends a fixed option prompt so the
             LLM answers with a letter; accuracy per task field, unparseable answers counted;
   - `open`  open questions (VoiceBench, AIR-Bench Chat): answers written to JSONL for an external judge
             (the paper used GPT-4o; no judge is called here);
   - `label` attribute questions built from manifest metadata (gender, age, emotion, language), scored by
             matching the answer to the label vocabulary;
   - `choice` questions with given candidate answers, scored by likelihood instead of generation: the
             candidate the LLM finds most probable is its answer (the usual zero-shot scoring of small LMs,
             which often ramble or always name the same option). Two-choice tasks also get the AUC of the
             log-odds: does the answer lean with the audio at all, whatever the LLM's prior for one option.

Every task runs three "systems" on the same questions in the same run:
    audio   the speech LLM on the real audio;
    oracle  the frozen LLM reading the oracle text (transcript + metadata, exactly the text SIFT imitates):
            the cascade upper bound the projectors can at best reach;
    silent  the speech LLM on silence of the same length: the floor (what the LLM guesses from the
            question alone, or the prior of the target).

    python evaluate.py --model DIR --manifest held_out.jsonl --task align|mcq|open|label|choice [--out DIR]

Outputs in --out: `{task}_answers.jsonl` (one line per question and system, appended after every batch, so
an interrupted run resumes where it stopped), `{task}_results.json` and `{task}_results.md`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import checks
import data
import generate_targets
from generate_targets import build_prompt, normalize_meta

OPTION_PROMPT = "Please make your choice among A/B/C/D and do not output other texts."
SYSTEMS = ("audio", "oracle", "silent")
TASKS = ("align", "mcq", "open", "label", "choice")

# ----------------------------------------------------------------------------------------------------------
# 1. Multiple-choice answers -> option letter
#
# A zero-shot LLM does not always obey "answer with a letter": it writes "B", "(B)", "Answer: B", "B. happy",
# "The speaker sounds happy." or "A or B". Counting those as wrong would measure instruction following,
# not hearing, so the parser accepts every unambiguous form and returns None only when it cannot tell.


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

    surfaces maps a phrase to its label. "middle-age adult" must not also count as "adult", so a match
    whose span lies inside another match's span is dropped before the labels are collected.
    """
    text = _norm(text)
    hits = [(s, e, label) for phrase, label in surfaces.items() for s, e in _phrase_spans(text, _norm(phrase))]
    kept = {label for s, e, label in hits
            if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in hits)}
    return kept


_KEYWORD = r"(?:answer|option|choice|choose|答案|选项|选择|选)"
_ARTICLE_FOLLOWERS = {"or", "and", "nor"}  # "A or B" names two options, "A male voice" names none


def _letter_mentions(text: str, letters: str, choices: list[str]) -> tuple[set[str], set[str]]:
    """Single letters in `text` that name an option -> (strong, weak) sets of upper-case letters.

    strong: "(B)", "[B]", "B." / "B)" / "B:" at the start, "answer: b", "选B";
    weak:   a lone capital letter anywhere ("I would pick C").
    A capital "A" followed by a word is the article ("A male voice"), unless that word starts the text
    of choice A itself ("A male" when A is "male") or is a conjunction ("A or B").
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
        elif re.search(_KEYWORD + r"\s*(?:is|would be|should be|will be|[:：是为])?\s*[\(\[]?\s*$", before, re.I):
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

    Order of evidence: a bare letter; explicit letter mentions (strong before weak); the text of exactly
    one choice ("The speaker sounds happy."). Mentions of two different letters are ambiguous -> None,
    without falling back to choice texts (the model hedged; it did not answer).
    """
    letters = "ABCDEFGHIJ"[: len(choices)]
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


# ----------------------------------------------------------------------------------------------------------
# 2. Label vocabularies for the `label` task
#
# The LLM answers in words, the manifest stores labels. Each label has a few surface forms ("woman" ->
# female, "anger" -> angry); an answer scores when its surface forms name exactly one label.

ATTRIBUTES = ("gender", "age", "emotion", "language")
AGE_GROUPS = ("teenager", "young adult", "middle-age adult", "senior")  # generate_targets.age_group
# A reference value that is no label. Target generation drops exactly the official recipe's spellings
# (generate_targets.UNKNOWN_VALUES) so the targets match the official ones; scoring also ignores a few more
# spellings of "no value", because counting "none" as a wrong answer would only add noise to the accuracy.
UNKNOWN_VALUES = generate_targets.UNKNOWN_VALUES | {"n/a", "none", "?"}
LANGUAGE_NAMES = {"en": "english", "zh": "chinese", "de": "german", "fr": "french", "es": "spanish",
                  "it": "italian", "ja": "japanese", "ko": "korean", "ru": "russian", "pt": "portuguese",
                  "ar": "arabic", "yue": "cantonese"}
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
    ("en", "english"), ("zh", "chinese", "mandarin"), ("de", "german"), ("fr", "french"), ("es", "spanish"),
    ("it", "italian"), ("ja", "japanese"), ("ko", "korean"), ("ru", "russian"), ("pt", "portuguese"),
    ("ar", "arabic"), ("yue", "cantonese"),
]


def surface_forms(vocab: list[str]) -> dict[str, str]:
    """Phrase -> label for a vocabulary. A synonym that is itself a label (RAVDESS has both "calm" and
    "neutral") stays that label; a language code ("en") is matched only through its name ("english")."""
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
    """An age as target generation writes it into `<meta>` (generate_targets.normalize_meta, the official
    age_to_group bands and quirks): numbers -> the four groups, group names pass through."""
    return normalize_meta({"age": value}).get("age")


def record_label(record: data.Record, attribute: str) -> str | None:
    """The label of one attribute of a record, normalised like the training metadata; None if unknown."""
    value = record.language if attribute == "language" else record.meta.get(attribute)
    if value is None or str(value).strip().lower() in UNKNOWN_VALUES:
        return None
    if attribute == "age":
        return age_label(value)  # the raw value: a numeric 0 is no age, "0" is (official quirk)
    value = str(value).strip().lower()
    if attribute == "language":
        value = value.split("-")[0].split("_")[0]  # en-US -> en
    return value


def label_vocabularies(records: list[data.Record]) -> dict[str, list[str]]:
    """The closed label set per attribute. Gender and age have fixed sets; emotion and language take the
    labels present in the manifest (plus en/zh, AZeroS' two languages). An attribute with fewer than two
    labels is dropped: a one-option question measures nothing."""
    seen = defaultdict(set)
    for r in records:
        for a in ATTRIBUTES:
            if (label := record_label(r, a)) is not None:
                seen[a].add(label)
    vocab = {"gender": ["male", "female"], "age": list(AGE_GROUPS),
             "emotion": sorted(seen["emotion"]), "language": sorted(seen["language"] | {"en", "zh"})}
    return {a: v for a, v in vocab.items() if seen[a] and len(v) >= 2}


def label_question(attribute: str, vocab: list[str]) -> str:
    """A zero-shot question whose options are the label vocabulary (languages by name)."""
    names = [LANGUAGE_NAMES.get(v, v).capitalize() if attribute == "language" else v for v in vocab]
    ask = {"gender": "What is the gender of the speaker?",
           "age": "What is the age group of the speaker?",
           "emotion": "What emotion does the speaker express?",
           "language": "Which language is the speaker speaking?"}[attribute]
    return f"{ask} Answer with one of: {', '.join(names)}."


# ----------------------------------------------------------------------------------------------------------
# 3. Questions: one Item per (audio, question); every system answers every item


@dataclass
class Item:
    """One question about one clip. `record` carries the audio and the oracle text's ingredients
    (transcript, meta, language); `fields` the task's own columns (answer, choices, reference, ...)."""
    id: str
    record: data.Record
    question: str
    fields: dict = field(default_factory=dict)


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is an error naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: a line must be a JSON object")
            rows.append((lineno, obj))
    return rows


def _row_record(obj: dict, path, lineno: int) -> data.Record:
    """The audio part of an mcq/open row as a Record; `text`/`meta`/`language` feed the oracle if given."""
    if not isinstance(obj.get("audio"), str) or not obj["audio"]:
        raise ValueError(f"{path}:{lineno}: field 'audio' missing")
    audio = Path(os.path.expanduser(obj["audio"]))
    audio = audio if audio.is_absolute() else Path(path).resolve().parent / audio
    rid = str(obj.get("id", obj.get("uniq_id", f"line{lineno}")))
    return data.Record(id=rid, audio=str(audio), duration=float(obj.get("duration") or 0.0),
                       text=obj.get("text") or "", language=obj.get("language"),
                       offset=float(obj.get("offset") or 0.0), meta=dict(obj.get("meta") or {}),
                       source=f"{path}:{lineno}")


def mcq_question(question: str, choices: list[str]) -> str:
    """AIR-Bench Foundation layout: question, lettered options, and the paper's fixed option prompt."""
    options = "\n".join(f"{'ABCDEFGHIJ'[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n{options}\n{OPTION_PROMPT}"


def unique_ids(items: list[Item], path) -> list[Item]:
    """Answers are keyed by id (that is what makes resuming work), so two rows must not share one."""
    seen = set()
    for it in items:
        if it.id in seen:
            raise ValueError(f"{it.record.source}: duplicate id {it.id!r} in {path}")
        seen.add(it.id)
    return items


def read_mcq(path) -> list[Item]:
    """Rows {audio, question, choices, answer[, task, id, text, meta]} -> Items.

    Also reads AIR-Bench's own columns (choice_a..choice_d, answer_gt, task_name, uniq_id). `answer` may be
    the letter or the text of the right choice.
    """
    items = []
    for lineno, obj in read_jsonl(path):
        choices = obj.get("choices") or [obj[k] for k in ("choice_a", "choice_b", "choice_c", "choice_d") if obj.get(k)]
        answer = obj.get("answer", obj.get("answer_gt"))
        if not choices or answer is None or not obj.get("question"):
            raise ValueError(f"{path}:{lineno}: an mcq row needs question, choices and answer")
        choices = [str(c) for c in choices]
        letter = str(answer).strip().upper() if str(answer).strip().upper() in "ABCDEFGHIJ"[: len(choices)] else None
        if letter is None:
            match = [i for i, c in enumerate(choices) if _norm(c) == _norm(str(answer))]
            if len(match) != 1:
                raise ValueError(f"{path}:{lineno}: answer {answer!r} is neither a letter nor one of the choices")
            letter = "ABCDEFGHIJ"[match[0]]
        rec = _row_record(obj, path, lineno)
        items.append(Item(rec.id, rec, mcq_question(obj["question"], choices),
                          {"task": str(obj.get("task", obj.get("task_name", "all"))), "choices": choices,
                           "answer": letter}))
    return unique_ids(items, path)


def read_open(path) -> list[Item]:
    """Rows {audio[, question, reference, task, id, text, meta]} -> Items. VoiceBench rows carry the
    question in the audio itself, so `question` may be missing: then the prompt is the audio alone."""
    items = []
    for lineno, obj in read_jsonl(path):
        rec = _row_record(obj, path, lineno)
        fields = {k: obj[k] for k in ("reference", "task") if obj.get(k) is not None}
        items.append(Item(rec.id, rec, str(obj.get("question") or ""), fields))
    return unique_ids(items, path)


def read_choice(path) -> list[Item]:
    """Rows {audio, question, choices, answer[, task, id, text, meta]} -> Items; `choices` are whole answers
    ("The speaker is a man."), `answer` is the index or the text of the right one."""
    items = []
    for lineno, obj in read_jsonl(path):
        choices, answer = obj.get("choices"), obj.get("answer")
        if not obj.get("question") or not isinstance(choices, list) or len(choices) < 2 or answer is None:
            raise ValueError(f"{path}:{lineno}: a choice row needs question, choices (a list of 2 or more answers) "
                             "and answer")
        choices = [str(c) for c in choices]
        if isinstance(answer, int) and not isinstance(answer, bool):
            if not 0 <= answer < len(choices):
                raise ValueError(f"{path}:{lineno}: answer index {answer} is out of range for {len(choices)} choices")
            index = answer
        elif str(answer) in choices:
            index = choices.index(str(answer))
        else:
            raise ValueError(f"{path}:{lineno}: answer {answer!r} is neither an index nor one of the choices")
        rec = _row_record(obj, path, lineno)
        items.append(Item(rec.id, rec, str(obj["question"]),
                          {"task": str(obj.get("task", "all")), "choices": choices, "answer": index}))
    return unique_ids(items, path)


def label_items(records: list[data.Record]) -> list[Item]:
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


# ----------------------------------------------------------------------------------------------------------
# 4. The three systems
#
# All three go through model.generate (inference chat template, left padding, greedy decoding), so the only
# difference between them is what stands where the audio goes: projected frames of the clip, projected
# frames of silence, or the oracle text itself. For `label` the oracle text holds the metadata, i.e. the
# answer: its score checks the question and the parser more than it bounds anything (language excepted).


def oracle_text(model, record: data.Record) -> str | None:
    """The text the audio stands for, built exactly as target generation builds the SIFT input: the
    transcript (semantic branch only) or `<audio><meta>k: v</meta><text>transcript</text></audio>` (both
    branches). None when the row has no transcript: no upper bound for it."""
    if not record.text:
        return None
    return build_prompt(record, "sift_sp" if model.use_paraling else "sift_s").input_text


def load_waves(records: list[data.Record], silent: bool) -> list[torch.Tensor]:
    """The clips of a batch. Silence keeps each clip's length, so the prompt has as many audio frames as
    the real clip and only the content differs."""
    waves = []
    for r in records:
        wave = data.load_audio(r.audio, r.offset, r.duration or None, r.channel)
        waves.append(torch.zeros_like(wave) if silent else wave)
    return waves


def user_turn(model, item: Item, system: str) -> dict:
    """The question as the user asks it: after the audio, or after the oracle text that stands for it."""
    if system == "oracle":
        return model.user_message(f"{oracle_text(model, item.record)} {item.question}", with_audio=False)
    return model.user_message(item.question)


@torch.no_grad()
def answer_batch(model, items: list[Item], system: str, max_new_tokens: int) -> list[str]:
    """Greedy answers of one system to a batch of items, all through model.generate (same template,
    padding and decoding): only what stands where the audio goes differs."""
    from llm import GenerationOptions

    messages = [[user_turn(model, it, system)] for it in items]
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    if system == "oracle":
        return model.generate(None, messages, options)
    waves = load_waves([it.record for it in items], silent=system == "silent")
    return model.generate(waves, messages, options)


@torch.no_grad()
def choice_nll(model, items: list[Item], system: str) -> list[list[float]]:
    """Summed NLL of every candidate answer of every item under one system (teacher-forced, the training
    template): one row per (item, candidate); the encoders run once per clip, not once per candidate."""
    counts = [len(it.fields["choices"]) for it in items]
    messages = [[user_turn(model, it, system), {"role": "assistant", "content": c}]
                for it in items for c in it.fields["choices"]]
    if system == "oracle":
        out = model.forward(messages)
    else:
        enc = model.encode(*model.features(load_waves([it.record for it in items], silent=system == "silent")))
        row = torch.tensor([i for i, n in enumerate(counts) for _ in range(n)])  # candidate row -> its clip
        enc = {b: (x[row.to(x.device)], lens[row.to(lens.device)]) for b, (x, lens) in enc.items()}
        out = model.forward(messages, encoder_outputs=enc)
    nll, per_item, start = out["row_nll"].tolist(), [], 0
    for n in counts:
        per_item.append(nll[start: start + n])
        start += n
    return per_item


# ----------------------------------------------------------------------------------------------------------
# 5. Resumable answer files: one JSON line per (id, system), appended after every batch


def load_done(path: Path, model_name: str) -> dict[tuple[str, str], dict]:
    """Rows already written by an earlier (interrupted) run, keyed by (id, system).

    A crash can leave half a line at the end: it is cut off so the next append starts a clean line.
    Rows from another model are refused: mixing two models' answers in one table would be silent nonsense.
    """
    if not path.exists():
        return {}
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    done = {}
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if row.get("model") != model_name:
                raise ValueError(f"{path}:{lineno} holds answers of model {row.get('model')!r}, not {model_name!r}; "
                                 "use another --out")
            done[(row["id"], row["system"])] = row
    return done


def append_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i: i + size]


def todo_items(items: list[Item], system: str, done: dict) -> list[Item]:
    """What is left for one system. The oracle skips rows without a transcript. Longest clips first, so
    similar lengths share a batch (less padding) and an out-of-memory shows up in the first batch."""
    left = [it for it in items if (it.id, system) not in done]
    if system == "oracle":
        left = [it for it in left if it.record.text]
    return sorted(left, key=lambda it: -it.record.duration)


def run_items(items: list[Item], path: Path, model_name: str, systems, batch_size: int, answer) -> dict:
    """Put every item to every system, appending each batch's rows; returns all rows by (id, system).
    `answer(chunk, system)` returns one dict of result fields per item (a generated response and its
    score, or the candidates' NLLs)."""
    done = load_done(path, model_name)
    for system in systems:
        todo = todo_items(items, system, done)
        for chunk in tqdm(list(batches(todo, batch_size)), desc=system, unit="batch", disable=not todo):
            rows = [{"id": it.id, "system": system, "model": model_name, "question": it.question, **it.fields,
                     **result} for it, result in zip(chunk, answer(chunk, system))]
            append_rows(path, rows)
            done.update({(r["id"], r["system"]): r for r in rows})
    return done


# ----------------------------------------------------------------------------------------------------------
# 6. Scores


def score_mcq_row(fields: dict, response: str) -> dict:
    pred = parse_option(response, fields["choices"])
    return {"pred": pred, "correct": pred == fields["answer"]}


def score_label_row(fields: dict, response: str) -> dict:
    pred = match_label(response, fields["vocab"])
    return {"pred": pred, "correct": pred == fields["label"]}


def score_open_row(fields: dict, response: str) -> dict:
    return {}


def grouped(rows: list[dict], group_key: str) -> list[tuple[str, list[dict]]]:
    """(group, rows) pairs: one per value of row[group_key] in name order, then "all" with every row. Rows
    whose group is "all" (no task field) are counted once."""
    groups = defaultdict(list)
    for r in rows:
        groups["all"].append(r)
        if r[group_key] != "all":
            groups[r[group_key]].append(r)
    return sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0]))


def accuracy_table(rows: list[dict], group_key: str) -> dict:
    """Accuracy (%) per group and overall, with the count of answers the parser could not map (`unparsed`,
    counted wrong: a zero-shot model that does not answer the question did not get it right)."""
    def acc(rs):
        n = len(rs)
        return {"n": n, "correct": sum(r["correct"] for r in rs),
                "accuracy": 100.0 * sum(r["correct"] for r in rs) / n if n else float("nan"),
                "unparsed": sum(r["pred"] is None for r in rs)}
    return {g: acc(rs) for g, rs in grouped(rows, group_key)}


def rescore(items: list[Item], done: dict, systems, score_row) -> dict[str, list[dict]]:
    """Rows of the current items per system, re-scored (so a better parser also applies to old answers)."""
    out = {}
    for system in systems:
        rows = []
        for it in items:
            row = done.get((it.id, system))
            if row is not None:
                rows.append({**row, **it.fields, **score_row(it.fields, row["response"])})
        out[system] = rows
    return out


def auc(scores: list[float], positive: list[bool]) -> float:
    """Probability that a random positive row scores above a random negative one (ties count half): 0.5 when
    the score ignores the class. NaN when a class is missing."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return float("nan")
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def summarize_choice(rows: dict[str, list[dict]]) -> dict[str, dict]:
    """Per system and task (and "all"): accuracy of the most likely candidate; for two-choice groups the AUC
    of the log-odds log p(choice 1) - log p(choice 0) against "the answer is choice 1" (accuracy can sit at
    the majority share when the LLM always prefers one option; the AUC then still shows whether the audio
    moves it); and how often the system picks what the oracle text picks."""
    def pick(row):  # the most likely candidate
        return min(range(len(row["nll"])), key=row["nll"].__getitem__)

    oracle_pick = {r["id"]: pick(r) for r in rows.get("oracle", [])}
    out = {}
    for system, rs in rows.items():
        out[system] = {}
        for g, grs in grouped(rs, "task"):
            picks = [pick(r) for r in grs]
            entry = {"n": len(grs), "accuracy": 100.0 * sum(p == r["answer"] for p, r in zip(picks, grs)) / len(grs)}
            if all(len(r["nll"]) == 2 for r in grs):
                entry["auc"] = 100.0 * auc([r["nll"][0] - r["nll"][1] for r in grs], [r["answer"] == 1 for r in grs])
            both = [(p, oracle_pick[r["id"]]) for p, r in zip(picks, grs) if r["id"] in oracle_pick]
            if system != "oracle" and both:
                entry["agrees_with_oracle"] = 100.0 * sum(a == b for a, b in both) / len(both)
            out[system][g] = entry
    return out


def summarize_open(rows: list[dict]) -> dict:
    words = [len(r["response"].split()) for r in rows]
    return {"n": len(rows), "empty": sum(w == 0 for w in words),
            "mean_words": sum(words) / len(words) if words else float("nan")}


# ----------------------------------------------------------------------------------------------------------
# 7. Alignment: cross-entropy of the self-generated target, audio vs oracle text (the SIFT objective)


def align_records(records: list[data.Record]) -> list[data.Record]:
    """Records that carry a self-generated target (generate_targets.py output)."""
    return [r for r in records if r.response is not None and r.mode]


def oracle_user_text(record: data.Record) -> str:
    """The LLM's own input for this target (generate_targets' `input_text`). tsit_s ran no LLM (its
    target is the transcript), so there the transcript plus the ASR instruction stands for the audio."""
    if record.mode == "tsit_s" or record.input_text is None:
        text = record.input_text if record.input_text is not None else build_prompt(record, "sift_s").input_text
        return f"{text} {record.instruction or ''}".strip()
    return record.input_text


def oracle_training_messages(record: data.Record) -> list[dict]:
    """The text counterpart of model.training_messages: the LLM's own input and its answer, rendered with
    the training template. No system turn, also for `_ssp` rows: training has none (the dialog system
    message only shaped the target), so the oracle must be scored on the same turns as the audio."""
    return [{"role": "user", "content": oracle_user_text(record)},
            {"role": "assistant", "content": record.response, "truncated": bool(record.truncated)}]


@torch.no_grad()
def target_nll(model, messages: list[list[dict]], waves=None, segments=None) -> list[tuple[float, int]]:
    """(summed NLL, number of target tokens) per row: model.forward's row_nll / row_tokens, on waveforms,
    on ready-made frames (oracle_segments), or on a text-only prompt (the oracle) when given neither."""
    if waves is not None:
        out = model.forward(messages, *model.features(waves))
    else:
        out = model.forward(messages, segments=segments)
    return [(float(s), int(n)) for s, n in zip(out["row_nll"].tolist(), out["row_tokens"].tolist())]


def oracle_segments(model, records: list[data.Record]) -> list[list[torch.Tensor]]:
    """The oracle text's own token embeddings, cut into the pieces the audio replaces: what a perfect
    projector would emit. Fed in place of the audio, the audio prompt *is* the text prompt, so the
    alignment ratio must be 1: a self-check of the whole measurement (the tests use it).

    Exact where the tokenizer splits the text prompt at the same places as the audio prompt around
    `<|AUDIO|>` (it does for these prompts with the test tokenizer; a BPE merge across a `<meta>`/`<text>`
    boundary would change a token or two)."""
    embed = model.llm.get_input_embeddings()
    out = []
    for r in records:
        text = oracle_user_text(r)
        if r.instruction and text.endswith(r.instruction):
            text = text[: -len(r.instruction)].rstrip()
        m = re.fullmatch(r"<audio><meta>(.*)</meta><text>(.*)</text></audio>", text, flags=re.S)
        pieces = [m.group(1), m.group(2)] if m else [text]
        if not model.use_paraling:
            pieces = pieces[-1:]
        ids = [torch.tensor(model.tokenizer.encode(p, add_special_tokens=False), dtype=torch.long,
                            device=embed.weight.device) for p in pieces]
        out.append([embed(i) for i in ids])
    return out


def run_align(model, records: list[data.Record], path: Path, model_name: str, systems, batch_size: int,
              segments_fn=None) -> dict:
    """Per (record, system) the target's summed NLL and token count, appended after every batch.

    audio/silent use the prompt the model is trained with (model.training_messages); `segments_fn`
    (model, records -> per-row frame lists) replaces the audio's frames, e.g. oracle_segments."""
    done = load_done(path, model_name)
    for system in systems:
        todo = sorted([r for r in records if (r.id, system) not in done], key=lambda r: -r.duration)
        for chunk in tqdm(list(batches(todo, batch_size)), desc=system, unit="batch", disable=not todo):
            if system == "oracle":
                scores = target_nll(model, [oracle_training_messages(r) for r in chunk])
            elif system == "audio" and segments_fn is not None:
                scores = target_nll(model, [model.training_messages(r) for r in chunk],
                                    segments=segments_fn(model, chunk))
            else:
                waves = load_waves(chunk, silent=system == "silent")
                scores = target_nll(model, [model.training_messages(r) for r in chunk], waves=waves)
            rows = [{"id": r.id, "system": system, "model": model_name, "mode": r.mode, "nll": s, "tokens": n}
                    for r, (s, n) in zip(chunk, scores)]
            append_rows(path, rows)
            done.update({(row["id"], row["system"]): row for row in rows})
    return done


def summarize_align(records: list[data.Record], done: dict, systems) -> dict:
    """Per mode (and "all"): mean CE per target token for each system, and audio / text, silent / text.

    Token-weighted (summed NLL over summed tokens), like the training loss, so long targets count by their
    length. Every system scores the same target tokens, so the ratio compares like with like."""
    nll, tokens, counts = defaultdict(float), defaultdict(int), defaultdict(int)
    for r in records:
        for mode in (r.mode, "all"):
            counts[mode] += 1
            for system in systems:
                if (row := done.get((r.id, system))) is not None:
                    nll[mode, system] += row["nll"]
                    tokens[mode, system] += row["tokens"]
    out = {}
    for mode in sorted(counts, key=lambda m: (m == "all", m)):
        ce = {s: nll[mode, s] / tokens[mode, s] for s in systems if tokens[mode, s]}
        entry = {"n": counts[mode], "tokens": max(tokens[mode, s] for s in systems), "ce": ce}
        for s in ("audio", "silent"):
            if s in ce and ce.get("oracle"):
                entry[f"ratio_{s}"] = ce[s] / ce["oracle"]
        out[mode] = entry
    return out


# ----------------------------------------------------------------------------------------------------------
# 8. Tables


def _fmt(x, digits=2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(task: str, results: dict) -> str:
    """The results as one Markdown table (rows: modes / task fields / attributes / systems)."""
    if task == "align":
        lines = ["| mode | n | tokens | CE audio | CE oracle text | CE silent | audio / text | silent / text |",
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
                lines.append(f"| {g} | {s} | {e['n']} | {_fmt(e['accuracy'], 1)} | {_fmt(e.get('auc'), 1)} | "
                             f"{_fmt(e.get('agrees_with_oracle'), 1)} |")
        return "\n".join(lines) + "\n"
    if task == "open":
        lines = ["| system | n | empty | mean words |", "| --- | ---: | ---: | ---: |"]
        for s, e in results["systems"].items():
            lines.append(f"| {s} | {e['n']} | {e['empty']} | {_fmt(e['mean_words'], 1)} |")
        return "\n".join(lines) + "\n"
    header = "task" if task == "mcq" else "attribute"
    groups = sorted({g for e in results["systems"].values() for g in e}, key=lambda g: (g == "all", g))
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


def _no_nan(x):
    """NaN (an empty group) -> null: json.dumps would write NaN, which strict JSON readers reject."""
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def write_results(out: Path, task: str, results: dict) -> None:
    results = _no_nan(results)
    (out / f"{task}_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out / f"{task}_results.md").write_text(markdown_table(task, results))


# ----------------------------------------------------------------------------------------------------------
# 9. Putting it together


def evaluate(model, task: str, manifest, out, *, model_name: str = "model", batch_size: int = 8,
             max_new_tokens: int = 200, systems=SYSTEMS, limit: int | None = None, segments_fn=None) -> dict:
    """Run one task end to end with an already loaded model; returns the results dict (also written)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{task}_answers.jsonl"
    head = {"task": task, "model": model_name, "manifest": str(manifest), "systems": {}}
    if task == "align":
        records = align_records(data.read_manifest(manifest))[:limit]
        if not records:
            raise ValueError(f"{manifest}: no record has a self-generated target (mode + response); "
                             "run generate_targets.py first")
        done = run_align(model, records, path, model_name, systems, batch_size, segments_fn)
        results = {**head, "systems": list(systems), "modes": summarize_align(records, done, systems)}
        write_results(out, task, results)
        return results

    if task == "choice":
        items = read_choice(manifest)[:limit]
        done = run_items(items, path, model_name, systems, batch_size,
                         lambda chunk, system: [{"nll": nll} for nll in choice_nll(model, chunk, system)])
        rows = {s: [done[it.id, s] for it in items if (it.id, s) in done] for s in systems}
        results = {**head, "systems": summarize_choice(rows)}
        write_results(out, task, results)
        return results

    if task == "mcq":
        items, score_row = read_mcq(manifest), score_mcq_row
    elif task == "open":
        items, score_row = read_open(manifest), score_open_row
    elif task == "label":
        items, score_row = label_items(data.read_manifest(manifest)), score_label_row
    else:
        raise ValueError(f"unknown task {task!r}; one of {TASKS}")
    items = items[:limit]
    def generate(chunk, system):
        answers = answer_batch(model, chunk, system, max_new_tokens)
        return [{"response": a, **score_row(it.fields, a)} for it, a in zip(chunk, answers)]
    done = run_items(items, path, model_name, systems, batch_size, generate)
    rows = rescore(items, done, systems, score_row)
    for system, rs in rows.items():
        if task == "open":
            head["systems"][system] = summarize_open(rs)
            write_judge_file(out / f"open_{system}.jsonl", rs)
        else:
            head["systems"][system] = accuracy_table(rs, "task" if task == "mcq" else "attribute")
    write_results(out, task, head)
    return head


def task_audio(task: str, manifest) -> list[data.Record]:
    """The audio rows of a task file, for the checks main() runs before loading the model."""
    if task in ("align", "label"):
        return data.read_manifest(manifest)
    read = {"choice": read_choice, "mcq": read_mcq, "open": read_open}[task]
    return [it.record for it in read(manifest)]


def write_judge_file(path: Path, rows: list[dict]) -> None:
    """One system's open answers in the layout judges read (VoiceBench: prompt/response[/reference])."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            row = {"id": r["id"], "prompt": r["question"], "response": r["response"]}
            row.update({k: r[k] for k in ("reference", "task") if k in r})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="model folder in the release layout (model.py)")
    p.add_argument("--manifest", required=True,
                   help="held-out manifest (align, label) or task JSONL (mcq, open, choice)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", default=None, help="output folder (default: eval/<task>)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=200, help="official evaluation: 200")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of audio,oracle,silent")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (quick look)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="LLM dtype (default: the checkpoint's on CUDA, float32 on CPU)")
    p.add_argument("--max-audio-seconds", type=float, default=checks.MAX_AUDIO_SECONDS,
                   help=checks.MAX_AUDIO_HELP)
    args = p.parse_args(argv)
    if args.max_new_tokens <= 0:
        p.error(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except (checks.CheckError, data.ManifestError, data.AudioError, FileNotFoundError) as e:
        print(f"error: {checks.first_line(e)}", file=sys.stderr)  # one line, no traceback
        sys.exit(1)


def run(args) -> None:
    checks.files_exist([args.manifest], "--manifest")  # these three before the model loads
    checks.device(args.device)
    checks.manifest_audio(task_audio(args.task, args.manifest), args.manifest,
                          args.max_audio_seconds)
    from model import AZeroS

    systems = [s for s in args.systems.split(",") if s]
    if not set(systems) <= set(SYSTEMS):
        sys.exit(f"--systems: unknown system in {args.systems!r}; use {','.join(SYSTEMS)}")
    dtype = getattr(torch, args.dtype) if args.dtype else None  # None: model.py's default for the device
    model = AZeroS.from_pretrained(args.model, device=args.device, dtype=dtype)
    model.eval()
    out = Path(args.out or Path("eval") / args.task)
    results = evaluate(model, args.task, args.manifest, out, model_name=str(Path(args.model).resolve()),
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, systems=systems,
                       limit=args.limit)
    print(markdown_table(args.task, results), end="")
    print(f"written: {out / (args.task + '_results.json')}, {out / (args.task + '_results.md')}")


if __name__ == "__main__":
    main()
