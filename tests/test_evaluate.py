"""evaluate.py and eval_support.py: answer parsing, label matching, exact scores on constructed
answers, the alignment self-check (oracle text embeddings in place of audio -> ratio 1), resuming,
and the CLI on a tiny release."""

import json
import math
import subprocess
import sys

import pytest
import torch

import data
import evaluate as ev
import generate_targets
import llm
from conftest import ROOT
from generate_targets import build_prompt
from support import eval_support as es
from support import labels

CHOICES = ["male", "female", "child", "senior"]
EMOTIONS = ["happy", "sad", "angry", "neutral"]
AGES = ["teenager", "young adult", "middle-age adult", "senior"]

# (answer, choices, expected letter): what zero-shot LLMs actually write
OPTION_TABLE = [
    ("A", CHOICES, "A"),
    ("b", CHOICES, "B"),
    ("(C)", CHOICES, "C"),
    ("[D]", EMOTIONS, "D"),
    ("A.", CHOICES, "A"),
    ("**C**", CHOICES, "C"),
    ("Answer: B", CHOICES, "B"),
    ("The answer is (D).", CHOICES, "D"),
    ("Option: d.", EMOTIONS, "D"),
    ("B. female", CHOICES, "B"),
    ("c) angry", EMOTIONS, "C"),
    ("I would choose D.", EMOTIONS, "D"),
    ("答案是B", EMOTIONS, "B"),
    ("选C", EMOTIONS, "C"),
    ("The answer is C because it is not A", EMOTIONS, "C"),
    (
        "A male voice.",
        ["female", "male", "child", "senior"],
        "B",
    ),  # the article "A", then choice text
    ("A male voice.", CHOICES, "A"),  # "A" followed by the text of choice A
    ("The speaker sounds happy.", EMOTIONS, "A"),
    ("I think it is a happy voice", EMOTIONS, "A"),  # lower-case "a" is an article
    ("the answer is a sad one", EMOTIONS, "B"),
    ("young adult", AGES, "B"),  # not also "adult" inside "middle-age adult"
    ("The speaker is female.", CHOICES, "B"),  # "male" is not inside "female"
    ("A or B", CHOICES, None),
    ("Both A and C are possible", CHOICES, None),
    ("(A) happy\n(B) sad", EMOTIONS, None),
    ("happy or sad", EMOTIONS, None),
    ("adult", AGES, None),
    ("None of the above.", EMOTIONS, None),
    ("E", EMOTIONS, None),  # only four options
    ("", EMOTIONS, None),
]


def test_parse_option_table():
    got = [(a, es.parse_option(a, c)) for a, c, _ in OPTION_TABLE]
    assert got == [(a, want) for a, _, want in OPTION_TABLE]
    assert len(OPTION_TABLE) >= 20


LABEL_TABLE = [
    ("Male.", ["male", "female"], "male"),
    ("The speaker is a woman.", ["male", "female"], "female"),
    ("female", ["male", "female"], "female"),
    ("It sounds like a man, not a woman", ["male", "female"], None),
    ("The speaker is middle-aged.", AGES, "middle-age adult"),
    ("young adult", AGES, "young adult"),
    ("an elderly person", AGES, "senior"),
    ("I can hear anger in the voice.", EMOTIONS, "angry"),
    ("calm", ["calm", "neutral", "sad"], "calm"),  # a synonym that is itself a label stays itself
    ("English", ["en", "zh"], "en"),
    ("Mandarin Chinese", ["en", "zh"], "zh"),
    ("It is spoken in english, I think", ["en", "de", "zh"], "en"),  # "it" is not Italian
    ("I cannot tell.", EMOTIONS, None),
]


def test_match_label_table():
    assert [es.match_label(a, v) for a, v, _ in LABEL_TABLE] == [want for _, _, want in LABEL_TABLE]


def _rec(rid, **kw):
    return data.Record(id=rid, audio="/nonexistent.wav", duration=1.0, **kw)


def test_no_value_spellings_are_no_label_but_the_targets_keep_the_official_rule():
    """Scoring skips every official "unknown" spelling and a few more; target generation drops only
    the official ones (its <meta> must match the official targets), "none" still reaches <meta>."""
    for value in sorted(labels.UNKNOWN_VALUES | {"n/a", "None", " ? "}):
        assert es.record_label(_rec("x", meta={"gender": value}), "gender") is None, value
    assert es.record_label(_rec("x", meta={"gender": " Female "}), "gender") == "female"
    assert generate_targets.format_meta({"gender": "none", "emotion": "unk"}) == "gender: none"


def test_label_items_vocabulary_and_normalisation():
    recs = [
        _rec("a", language="en-US", meta={"gender": "Male", "age": "34", "emotion": "happy"}),
        _rec("b", language="zh", meta={"gender": "female", "age": "unknown", "emotion": "sad"}),
        _rec("c", language="en", meta={"gender": "na"}),
    ]
    items = {it.id: it for it in es.label_items(recs)}
    assert sorted(items) == [
        "a/age",
        "a/emotion",
        "a/gender",
        "a/language",
        "b/emotion",
        "b/gender",
        "b/language",
        "c/language",
    ]
    assert (
        items["a/age"].fields["label"] == "young adult"
        and items["a/language"].fields["label"] == "en"
    )
    assert items["a/emotion"].fields["vocab"] == ["happy", "sad"]
    assert items["a/language"].question.endswith("Answer with one of: English, Chinese.")


# -------------------------------------------------------------------------------------------------
# Exact scores on constructed answers (the model's answer function is replaced; scoring, files and
# tables are the real ones)


def _fake_answers(monkeypatch, answers: dict):
    """answer_batch returns answers[(item id, system)]; records every call so tests can count."""
    calls = []

    def fake(model, items, system, max_new_tokens):
        calls.append((system, [it.id for it in items]))
        return [answers[(it.id, system)] for it in items]

    monkeypatch.setattr(ev, "answer_batch", fake)
    return calls


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_label_exact_accuracy(tmp_path, monkeypatch):
    rows = [
        {
            "id": f"u{i}",
            "audio": "x.wav",
            "duration": 1.0,
            "text": "hello there",
            "language": "en",
            "meta": {"gender": g, "emotion": e},
        }
        for i, (g, e) in enumerate(
            [("male", "happy"), ("female", "sad"), ("female", "happy"), ("male", "neutral")]
        )
    ]
    manifest = _write_jsonl(tmp_path / "m.jsonl", rows)
    answers = {}
    # audio: gender 3/4 right (one wrong), emotion 2/4 right (one wrong, one unparseable)
    for uid, g in zip(["u0", "u1", "u2", "u3"], ["Male.", "a woman", "male", "He is male"]):
        answers[(f"{uid}/gender", "audio")] = g
    for uid, e in zip(["u0", "u1", "u2", "u3"], ["happy", "sad", "I don't know", "It sounds sad."]):
        answers[(f"{uid}/emotion", "audio")] = e
    for uid in ["u0", "u1", "u2", "u3"]:
        answers[(f"{uid}/language", "audio")] = "English"
    items = es.label_items(data.read_manifest(manifest))
    for it in items:  # oracle: always right; silent: always "male", "neutral", "Chinese"
        answers[(it.id, "oracle")] = it.fields["label"]
        answers[(it.id, "silent")] = {
            "gender": "male",
            "emotion": "neutral",
            "language": "Chinese",
        }[it.fields["attribute"]]
    _fake_answers(monkeypatch, answers)
    res = ev.evaluate(None, "label", manifest, tmp_path / "out", batch_size=3)
    audio, oracle, silent = (res["systems"][s] for s in ("audio", "oracle", "silent"))
    assert audio["gender"]["accuracy"] == 75.0 and audio["gender"]["unparsed"] == 0
    assert audio["emotion"]["accuracy"] == 50.0 and audio["emotion"]["unparsed"] == 1
    assert audio["language"]["accuracy"] == 100.0
    assert audio["all"] == {"n": 12, "correct": 9, "accuracy": 75.0, "unparsed": 1}
    assert oracle["all"]["accuracy"] == 100.0
    assert silent["gender"]["accuracy"] == 50.0 and silent["emotion"]["accuracy"] == 25.0
    assert silent["language"]["accuracy"] == 0.0
    md = (tmp_path / "out" / "label_results.md").read_text()
    assert "| gender | 4 | 75.0 (0) | 100.0 (0) | 50.0 (0) |" in md
    assert (
        json.loads((tmp_path / "out" / "label_results.json").read_text())["systems"]["audio"][
            "all"
        ]["correct"]
        == 9
    )


def test_mcq_accuracy_per_task_and_resume(tmp_path, monkeypatch):
    rows = [
        {
            "id": "q1",
            "audio": "a.wav",
            "question": "Gender?",
            "choices": ["male", "female"],
            "answer": "A",
            "task": "gender",
            "text": "hi",
        },
        {
            "id": "q2",
            "audio": "a.wav",
            "question": "Gender?",
            "choices": ["male", "female"],
            "answer": "female",
            "task": "gender",
        },
        {
            "uniq_id": 3,
            "audio": "a.wav",
            "question": "Emotion?",
            "choice_a": "sad",
            "choice_b": "happy",
            "choice_c": "angry",
            "choice_d": "neutral",
            "answer_gt": "angry",
            "task_name": "emotion",
        },
    ]
    manifest = _write_jsonl(tmp_path / "mcq.jsonl", rows)
    items = es.read_mcq(manifest)
    assert [it.fields["answer"] for it in items] == ["A", "B", "C"]
    assert items[2].id == "3" and items[2].question.endswith(es.OPTION_PROMPT)
    assert "\nC. angry\n" in items[2].question
    answers = {
        ("q1", "audio"): "A",
        ("q2", "audio"): "Probably A or B",
        ("3", "audio"): "The answer is (C).",
        ("q1", "oracle"): "B",
        ("q1", "silent"): "A",
        ("q2", "silent"): "A",
        ("3", "silent"): "D",
    }
    calls = _fake_answers(monkeypatch, answers)
    res = ev.evaluate(None, "mcq", manifest, tmp_path / "out", batch_size=2)
    audio = res["systems"]["audio"]
    assert audio["gender"] == {"n": 2, "correct": 1, "accuracy": 50.0, "unparsed": 1}
    assert audio["emotion"]["accuracy"] == 100.0 and audio["all"]["correct"] == 2
    # only q1 has a transcript, so only q1 gets an oracle answer (the upper bound needs the text)
    assert res["systems"]["oracle"]["all"] == {"n": 1, "correct": 0, "accuracy": 0.0, "unparsed": 0}
    assert res["systems"]["silent"]["all"]["correct"] == 1
    assert sum(len(ids) for _, ids in calls) == 7

    # resume: a crash left half a line; a second run redoes only what is missing
    answers_path = tmp_path / "out" / "mcq_answers.jsonl"
    lines = answers_path.read_text().splitlines(keepends=True)
    answers_path.write_text("".join(lines[:-1]) + lines[-1][:10])
    calls.clear()
    again = ev.evaluate(None, "mcq", manifest, tmp_path / "out", batch_size=2)
    assert sum(len(ids) for _, ids in calls) == 1
    assert again["systems"] == res["systems"]
    assert len(answers_path.read_text().splitlines()) == 7
    with pytest.raises(ValueError, match="another --out"):
        ev.evaluate(None, "mcq", manifest, tmp_path / "out", model_name="other")


# -------------------------------------------------------------------------------------------------
# With a tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from model import AZeroS
    from tiny import make_tiny_release, write_wav

    root = tmp_path_factory.mktemp("evaluate")
    release = make_tiny_release(root / "release", paraling=True)
    model = AZeroS.from_pretrained(release)
    for i, seconds in enumerate([1.3, 2.1, 1.7]):
        write_wav(root / f"clip{i}.wav", seconds, seed=i)
    return model, release, root


def _target_manifest(root, modes):
    """A held-out manifest as generate_targets.py writes it (input_text from its build_prompt)."""
    texts = ["hello world, how are you", "we shall stop in a minute", "good morning to you"]
    metas = [
        {"gender": "male", "emotion": "happy"},
        {"gender": "female", "age": "senior"},
        {"emotion": "sad"},
    ]
    durations = [1.3, 2.1, 1.7]
    rows = []
    for i, mode in enumerate(modes):
        rec = data.Record(
            id=f"r{i}",
            audio=str(root / f"clip{i % 3}.wav"),
            duration=durations[i % 3],
            text=texts[i % 3],
            language="en",
            meta=metas[i % 3],
        )
        prompt = build_prompt(rec, mode)
        rows.append(
            {
                **rec.to_json(),
                "mode": mode,
                "system": prompt.system,
                "instruction": prompt.instruction,
                "input_text": prompt.input_text,
                "response": f"i hear {texts[i % 3]}.",
                "truncated": i == 1,
                "model": "tiny",
            }
        )
    return _write_jsonl(root / f"targets_{'_'.join(modes)}.jsonl", rows)


@pytest.mark.parametrize(
    "stage,modes",
    [(None, ["sift_sp", "sit_sp", "sift_ssp", "sift_sp"]), (1, ["sift_s", "sit_s", "sift_s"])],
)
def test_align_oracle_embeddings_give_ratio_one(tiny, tmp_path, stage, modes):
    model, _, root = tiny
    manifest = _target_manifest(root, modes)
    records = data.read_manifest(manifest)
    model.set_stage(stage)  # stage 1: speech branch only, the prompt is a single <|AUDIO|>
    try:
        # precondition: with the oracle pieces spliced in, the audio prompt's LLM input equals the
        # text prompt's (the tokenizer splits the text where the audio prompt has <|AUDIO|>)
        for r, segs in zip(records, ev.oracle_segments(model, records)):
            spliced = llm.build_batch(
                model.llm, model.tokenizer, [model.training_messages(r)], [segs], training=True
            )
            text = llm.build_batch(
                model.llm, model.tokenizer, [ev.oracle_training_messages(r)], training=True
            )
            assert torch.equal(spliced.inputs_embeds, text.inputs_embeds) and torch.equal(
                spliced.labels, text.labels
            )
        res = ev.evaluate(
            model, "align", manifest, tmp_path, batch_size=2, segments_fn=ev.oracle_segments
        )
    finally:
        model.set_stage(None)
    for mode, e in res["modes"].items():
        assert e["ratio_audio"] == pytest.approx(1.0, abs=1e-4), mode
        assert e["ce"]["silent"] > 0 and e["tokens"] > 0
    assert set(res["modes"]) == set(modes) | {"all"}
    assert "| all |" in (tmp_path / "align_results.md").read_text()


def test_align_scores_ssp_rows_on_the_sp_turns(tiny, tmp_path):
    """A sift_ssp target was generated under the dialog system message, but training shows no system
    turn (official trainer), so align scores it on exactly the turns of a sift_sp row: audio, oracle
    and silent numbers are equal for the same rows labelled either way."""
    model, _, root = tiny
    ssp = data.read_manifest(_target_manifest(root, ["sift_ssp", "sift_ssp"]))
    sp = data.read_manifest(_target_manifest(root, ["sift_sp", "sift_sp"]))
    assert ssp[0].system and not sp[0].system  # the manifests differ in the system message
    for a, b in zip(ssp, sp):
        assert ev.oracle_training_messages(a) == ev.oracle_training_messages(b)
        assert model.training_messages(a) == model.training_messages(b)
    res = [
        ev.evaluate(model, "align", m, tmp_path / m.stem, batch_size=2)["modes"]["all"]["ce"]
        for m in (root / "targets_sift_ssp_sift_ssp.jsonl", root / "targets_sift_sp_sift_sp.jsonl")
    ]
    assert res[0] == res[1]


def test_align_on_audio_runs_and_resumes(tiny, tmp_path, monkeypatch):
    model, _, root = tiny
    manifest = _target_manifest(root, ["sift_sp", "sit_sp"])
    res = ev.evaluate(model, "align", manifest, tmp_path, batch_size=2)
    e = res["modes"]["all"]
    assert e["n"] == 2 and all(v > 0 for v in e["ce"].values()) and e["ratio_audio"] > 0
    lines = (tmp_path / "align_answers.jsonl").read_text().splitlines()
    assert len(lines) == 6  # 2 records x 3 systems
    # per-row numbers agree with model.forward's batch mean
    records = data.read_manifest(manifest)
    waves = ev.load_waves(records, silent=False)
    with torch.no_grad():
        out = model.forward([model.training_messages(r) for r in records], model.features(waves))
    rows = [json.loads(x) for x in lines if json.loads(x)["system"] == "audio"]
    total = sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows)
    assert total == pytest.approx(float(out["loss"]), rel=1e-5)
    monkeypatch.setattr(
        ev, "target_nll", lambda *a, **k: pytest.fail("resumed run recomputed a row")
    )
    assert ev.evaluate(model, "align", manifest, tmp_path, batch_size=2)["modes"] == res["modes"]


def test_open_answers_for_judge(tiny, tmp_path):
    model, _, root = tiny
    rows = [
        {
            "id": "o1",
            "audio": str(root / "clip0.wav"),
            "question": "What did you hear?",
            "reference": "hello",
            "text": "hello world",
        },
        {"id": "o2", "audio": str(root / "clip1.wav")},
    ]
    manifest = _write_jsonl(tmp_path / "open.jsonl", rows)
    res = ev.evaluate(model, "open", manifest, tmp_path / "out", batch_size=2, max_new_tokens=4)
    assert {s: e["n"] for s, e in res["systems"].items()} == {"audio": 2, "oracle": 1, "silent": 2}
    judged = [
        json.loads(x) for x in (tmp_path / "out" / "open_audio.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in judged] == ["o1", "o2"] and judged[0]["reference"] == "hello"
    assert judged[0]["prompt"] == "What did you hear?" and all(
        isinstance(r["response"], str) for r in judged
    )


def test_cli_label_on_tiny_release(tiny, tmp_path):
    _, release, root = tiny
    rows = [
        {
            "id": f"c{i}",
            "audio": str(root / f"clip{i}.wav"),
            "duration": d,
            "text": "good morning",
            "language": "en",
            "meta": {"gender": g},
        }
        for i, (d, g) in enumerate([(1.3, "male"), (2.1, "female")])
    ]
    manifest = _write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            "--model",
            str(release),
            "--manifest",
            str(manifest),
            "--task",
            "label",
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "label_results.json").read_text())
    assert set(res["systems"]) == {"audio", "oracle", "silent"}
    assert res["systems"]["audio"]["all"]["n"] == 4  # 2 clips x (gender, language)
    assert "| gender | 2 |" in proc.stdout
    assert len((out / "label_answers.jsonl").read_text().splitlines()) == 12


# -------------------------------------------------------------------------------------------------
# choice: candidate answers scored by likelihood


def test_choice_summary_exact():
    """Hand-made NLLs: 4 items, the right answer alternates. Audio picks choice 1 for all (accuracy
    = share of answer 1 = 50%) but its log-odds still rank the two classes perfectly (AUC 100);
    silent is constant (AUC 50); agreement with the oracle's picks is counted per item."""
    answers = [1, 0, 1, 0]

    def rows(nlls):
        return [
            {"id": f"q{i}", "task": "gender", "answer": a, "nll": n}
            for i, (a, n) in enumerate(zip(answers, nlls))
        ]

    summary = ev.summarize_choice(
        {
            "oracle": rows([[2.0, 1.0], [1.0, 2.0], [2.0, 1.0], [2.0, 1.5]]),  # picks 1, 0, 1, 1
            "audio": rows(
                [[3.0, 1.0], [2.0, 1.5], [3.0, 1.0], [2.5, 2.0]]
            ),  # log-odds 2, .5, 2, .5; picks 1,1,1,1
            "silent": rows([[2.0, 1.0]] * 4),  # log-odds 1 everywhere
        }
    )
    assert summary["oracle"]["gender"] == {"n": 4, "accuracy": 75.0, "auc": 100.0}
    assert summary["audio"]["all"] == {
        "n": 4,
        "accuracy": 50.0,
        "auc": 100.0,
        "agrees_with_oracle": 75.0,
    }
    assert summary["silent"]["gender"] == {
        "n": 4,
        "accuracy": 50.0,
        "auc": 50.0,
        "agrees_with_oracle": 75.0,
    }
    assert es.auc([0.3, 0.1, 0.2], [True, False, False]) == 1.0
    assert es.auc([0.1, 0.3, 0.2], [True, False, True]) == 0.0
    assert es.auc([0.2, 0.2, 0.1], [True, False, False]) == 0.75  # a tie counts half
    assert math.isnan(es.auc([1.0, 2.0], [True, True]))


def test_read_choice_errors(tmp_path):
    good = {
        "id": "a",
        "audio": "a.wav",
        "question": "Man or woman?",
        "choices": ["A man.", "A woman."],
    }
    cases = [
        ({**good, "answer": 2}, "answer index 2 is out of range for 2 choices"),
        (
            {**good, "answer": "A child."},
            "answer 'A child.' is neither an index nor one of the choices",
        ),
        ({**good, "choices": ["A man."], "answer": 0}, "choices (a list of 2 or more answers)"),
    ]
    for row, msg in cases:
        path = _write_jsonl(tmp_path / "c.jsonl", [{**good, "id": "ok", "answer": "A woman."}, row])
        with pytest.raises(ValueError) as e:
            es.read_choice(path)
        assert str(e.value).startswith(f"{path}:2: ") and msg in str(e.value), str(e.value)
    items = es.read_choice(_write_jsonl(tmp_path / "ok.jsonl", [{**good, "answer": "A woman."}]))
    assert items[0].fields == {"task": "all", "choices": ["A man.", "A woman."], "answer": 1}


def test_choice_nll_equals_single_forward_and_resumes(tiny, tmp_path, monkeypatch):
    """Each stored NLL equals model.forward on that one (clip, question, candidate) conversation
    alone: the batching of candidates and the reuse of one encoder pass per clip change nothing."""
    model, _, root = tiny
    q, choices = (
        "Is the speaker a man or a woman?",
        ["The speaker is a man.", "The speaker is a woman."],
    )
    rows = [
        {
            "id": f"c{i}",
            "audio": str(root / f"clip{i}.wav"),
            "duration": d,
            "text": "good morning",
            "meta": {"gender": g},
            "question": q,
            "choices": choices,
            "answer": int(g == "female"),
        }
        for i, (d, g) in enumerate([(1.3, "male"), (2.1, "female"), (1.7, "female")])
    ]
    manifest = _write_jsonl(tmp_path / "choice.jsonl", rows)
    res = ev.evaluate(model, "choice", manifest, tmp_path / "out", batch_size=2)
    stored = {
        (r["id"], r["system"]): r["nll"]
        for r in map(
            json.loads, (tmp_path / "out" / "choice_answers.jsonl").read_text().splitlines()
        )
    }
    assert len(stored) == 9
    items = es.read_choice(manifest)
    with torch.no_grad():
        for it in items:
            for system in ev.SYSTEMS:
                for k, c in enumerate(choices):
                    msgs = [[ev.user_turn(model, it, system), {"role": "assistant", "content": c}]]
                    if system == "oracle":
                        out = model.forward(msgs)
                    else:
                        wave = ev.load_waves([it.record], silent=system == "silent")
                        out = model.forward(msgs, model.features(wave))
                    assert stored[it.id, system][k] == pytest.approx(
                        float(out["row_nll"][0]), rel=1e-5
                    )
    assert res["systems"]["audio"]["all"]["n"] == 3 and "auc" in res["systems"]["silent"]["all"]
    assert "| all | audio | 3 |" in (tmp_path / "out" / "choice_results.md").read_text()
    monkeypatch.setattr(
        ev, "choice_nll", lambda *a, **k: pytest.fail("resumed run recomputed a row")
    )
    assert (
        ev.evaluate(model, "choice", manifest, tmp_path / "out", batch_size=2)["systems"]
        == res["systems"]
    )


def test_rows_without_task_are_counted_once():
    rows = [
        {"task": "all", "correct": True, "pred": "A"},
        {"task": "all", "correct": False, "pred": None},
    ]
    assert es.accuracy_table(rows, "task") == {
        "all": {"n": 2, "correct": 1, "accuracy": 50.0, "unparsed": 1}
    }


@pytest.mark.parametrize(
    "value,label",
    [
        (0, None),
        ("0", "young adult"),
        (25, "young adult"),
        ("-5", "young adult"),
        (250, None),
        ("Senior", "senior"),
    ],
)
def test_age_label_follows_the_training_metadata(value, label):
    """Scoring labels ages as target generation does (gt.normalize_meta), a zero age included."""
    assert es.age_label(value) == label
    record = data.Record(id="a", audio="/a.wav", duration=1.0, meta={"age": value})
    meta = f"age: {label}" if label else ""
    assert f"<meta>{meta}</meta>" in build_prompt(record, "sift_sp").input_text
