"""Manifests: our JSONL schema, official Lhotse cut lines, error messages, the `check` CLI."""
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT
from support import manifest


def write_lines(path, objs):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for o in objs:
            f.write((o if isinstance(o, str) else json.dumps(o, ensure_ascii=False)) + "\n")
    return path


def ours(**kw):
    line = {"id": "utt1", "audio": "wavs/a.wav", "duration": 2.5, "text": "hello there",
            "language": "en", "meta": {"gender": "female", "age": "young adult", "emotion": "sad"}}
    line.update(kw)
    return line


def lhotse_cut(cut_id="cut1", source="audio/rec.wav", **custom):
    """A MonoCut as Lhotse's CutSet.to_file writes it (cf. the official data_module.py example)."""
    return {
        "id": cut_id, "start": 1.5, "duration": 3.21, "channel": 0,
        "supervisions": [{"id": cut_id, "recording_id": "rec1", "start": 0.0, "duration": 3.21,
                          "channel": 0, "text": "你好，世界！", "language": "zh",
                          "gender": "female", "custom": custom}],
        "recording": {"id": "rec1",
                      "sources": [{"type": "file", "channels": [0], "source": source}],
                      "sampling_rate": 16000, "num_samples": 51360, "duration": 3.21,
                      "channel_ids": [0]},
        "type": "MonoCut",
    }


def test_our_jsonl_resolves_relative_paths_and_round_trips(tmp_path):
    (tmp_path / "set").mkdir()
    path = write_lines(tmp_path / "set" / "m.jsonl", [
        ours(), "", ours(id="utt2", audio="/abs/b.wav", offset=0.5, response="hi", truncated=True,
                         mode="sift_sp", instruction="", model="qwen", custom_key=[1, 2])])
    recs = manifest.read_manifest(path)
    assert [r.id for r in recs] == ["utt1", "utt2"]
    assert recs[0].audio == str((tmp_path / "set" / "wavs" / "a.wav").resolve())
    assert recs[0].meta == {"gender": "female", "age": "young adult", "emotion": "sad"}
    assert recs[0].source == f"{path}:1" and recs[1].source == f"{path}:3"  # blank line 2 skipped
    second = recs[1]
    assert (second.offset, second.truncated, second.instruction) == (0.5, True, "")
    assert second.extra == {"custom_key": [1, 2]}
    for out in (tmp_path / "copy.jsonl", tmp_path / "sub" / "copy.jsonl.gz"):
        manifest.write_manifest(recs, out, relative=out.suffix == ".jsonl")
        again = manifest.read_manifest(out)
        for a, b in zip(recs, again):
            a_fields, b_fields = vars(a).copy(), vars(b).copy()
            a_fields.pop("source"), b_fields.pop("source")
            assert a_fields == b_fields
    assert not list(tmp_path.glob("**/*.tmp"))  # the atomic writer cleaned up


def test_lhotse_monocut_lines_map_to_records(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # Lhotse opens relative sources from here
    path = write_lines(tmp_path / "cuts.jsonl.gz", [
        lhotse_cut(age_group="middle-age adult", emotion="happy", response="你好！<|truncated|>",
                   instruction="", input_text="<audio>...</audio>",
                   from_model="Qwen/Qwen2.5-7B-Instruct"),
        lhotse_cut("cut2", source="/data/x.flac", age=33),
    ])
    first, second = manifest.read_manifest(path)
    assert (first.id, first.offset, first.duration) == ("cut1", 1.5, 3.21)
    assert (first.text, first.language) == ("你好，世界！", "zh")
    assert first.audio == str((tmp_path / "work" / "audio" / "rec.wav").resolve())
    assert first.meta == {"age": "middle-age adult", "gender": "female", "emotion": "happy"}
    assert (first.response, first.truncated, first.instruction) == ("你好！", True, "")
    assert (first.input_text, first.model, first.channel) == (
        "<audio>...</audio>", "Qwen/Qwen2.5-7B-Instruct", None)
    assert second.audio == "/data/x.flac" and second.meta == {"age": 33, "gender": "female"}
    assert second.response is None and not second.truncated


def _mutate(fn):
    cut = lhotse_cut()
    fn(cut)
    return cut


BROKEN = [  # (lines, line number, field, what the message says)
    (['{"id": "a", "audio": "x.wav", "duration": 1.0'], 1, "<json>", "not valid JSON"),
    (["[1, 2]"], 1, "<json>", "a line must be a JSON object, got list"),
    ([ours(), {"audio": "x.wav", "duration": 1}], 2, "id", "missing"),
    ([{"id": "a", "duration": 1.0}], 1, "audio", "missing"),
    ([{"id": "a", "audio": "x.wav"}], 1, "duration", "missing"),
    ([ours(duration="2.5")], 1, "duration", "must be a number of seconds, got str '2.5'"),
    ([ours(duration=0)], 1, "duration", "must be positive, got 0"),
    ([ours(duration=-1.5)], 1, "duration", "must be positive, got -1.5"),
    ([ours(duration=True)], 1, "duration", "must be a number of seconds, got bool True"),
    ([ours(offset=-0.1)], 1, "offset", "must not be negative, got -0.1"),
    ([ours(text=["a"])], 1, "text", "must be a string, got list"),
    ([ours(id="")], 1, "id", "must not be empty"),
    ([ours(meta="female")], 1, "meta", "must be an object, got str"),
    ([ours(meta={"gender": ["f"]})], 1, "meta.gender", "must be a string or number, got list"),
    ([ours(truncated="yes")], 1, "truncated", "must be true or false, got 'yes'"),
    ([ours(), ours(id="b"), ours()], 3, "id", "duplicate id 'utt1' (first on line 1)"),
    ([_mutate(lambda c: c.update(type="MixedCut"))], 1, "type",
     "unsupported Lhotse cut type 'MixedCut'"),
    ([_mutate(lambda c: c.pop("recording"))], 1, "recording", "missing or not an object"),
    ([_mutate(lambda c: c["recording"].update(sources=[]))], 1, "recording.sources",
     "must be a non-empty list"),
    ([_mutate(lambda c: c["recording"]["sources"][0].update(type="url"))], 1,
     "recording.sources[0].type", "only 'file' sources are supported, got 'url'"),
    ([_mutate(lambda c: c.update(supervisions=[]))], 1, "supervisions", "must be a non-empty list"),
    ([_mutate(lambda c: c["supervisions"][0].update(text=3))], 1, "supervisions[0].text",
     "must be a string, got int"),
    ([_mutate(lambda c: c.update(duration="3.2"))], 1, "duration",
     "must be a number of seconds, got str"),
]


def two_supervisions(cut):
    second = dict(cut["supervisions"][0], id="s2", start=2.0, duration=1.21, text="再见")
    cut["supervisions"][0]["duration"] = 2.0
    cut["supervisions"].append(second)


FIX = "python prepare.py cuts {path} OUT_DIR"  # the command each refusal names
REFUSED_CUTS = [  # (mutation, field, what the message says)
    (lambda c: c["recording"].update(transforms=[{"name": "Speed", "kwargs": {"factor": 1.1}}]),
     "recording.transforms", "Speed not applied by this reader; write the transformed audio with "
     f"`{FIX}`"),
    (two_supervisions, "supervisions", "2 supervisions in one cut (its text would be the first "
     f"one's for all the audio); split them with `{FIX}`"),
    (lambda c: c["supervisions"][0].update(start=0.5, duration=1.0), "supervisions[0]",
     f"covers 0.5-1.5 s of a 3.21 s cut (the rest has no text); trim the cut to it with `{FIX}`"),
    (lambda c: c["supervisions"][0].update(gender="x"), "supervisions[0].gender",
     "unknown gender label 'x' (the official vocabulary: female, male; add its spelling to "
     "labels.TABLE)"),
    (lambda c: c["supervisions"][0].update(language="Klingon"), "supervisions[0].language",
     "unknown language label 'Klingon'"),
    (lambda c: c["supervisions"][0]["custom"].update(emotion="bored"),
     "supervisions[0].custom.emotion", "unknown emotion label 'bored'"),
    (lambda c: c["supervisions"][0]["custom"].update(age_group="old"),
     "supervisions[0].custom.age_group", "unknown age label 'old'"),
]


@pytest.mark.parametrize("mutation,field,what", REFUSED_CUTS,
                         ids=[r[1] for r in REFUSED_CUTS])
def test_lhotse_cuts_that_would_be_misread_are_refused(tmp_path, mutation, field, what):
    path = write_lines(tmp_path / "cuts.jsonl", [_mutate(mutation)])
    with pytest.raises(manifest.ManifestError) as err:
        manifest.read_manifest(path)
    assert str(err.value).startswith(f"{path}:1: field '{field}': {what.format(path=path)}")
    assert "\n" not in str(err.value)


def test_lhotse_labels_and_language_names_become_the_official_vocabulary(tmp_path):
    """What `lhotse prepare commonvoice` / `voxceleb` / `daily_talk` / `aishell` write."""
    cuts = []
    for lang, gender, custom in [
        ("Chinese", "male_masculine", {"age": "twenties"}),
        ("English", "f", {"emotion": "no emotion"}),
        ("zh-CN", "F", {"age_group": "Senior", "emotion": "happiness"}),
        ("en", "do_not_wish_to_say", {"age": "fourties"})]:
        cut = lhotse_cut(f"cut{len(cuts)}")
        cut["supervisions"][0].update(language=lang, gender=gender, custom=custom)
        cuts.append(cut)
    recs = manifest.read_manifest(write_lines(tmp_path / "cuts.jsonl", cuts))
    assert [(r.language, r.meta) for r in recs] == [
        ("zh", {"age": "young adult", "gender": "male"}),
        ("en", {"gender": "female", "emotion": "neutral"}),
        ("zh", {"age": "senior", "gender": "female", "emotion": "happy"}),
        ("en", {"age": "middle-age adult"}),
    ]


def test_invalid_utf8_line_is_reported_with_its_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(ours()).encode() + b"\n" + b'{"id": "\xff\xfe"}\n')
    with pytest.raises(manifest.ManifestError, match=f"^{path}:2: field '<json>': not valid UTF-8"):
        manifest.read_manifest(path)


@pytest.mark.parametrize("lines,lineno,field,what", BROKEN,
                         ids=[f"{b[2]}-{i}" for i, b in enumerate(BROKEN)])
def test_broken_lines_name_file_line_and_field(tmp_path, lines, lineno, field, what):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(manifest.ManifestError) as err:
        manifest.read_manifest(path)
    assert str(err.value).startswith(f"{path}:{lineno}: field '{field}': {what}")
    assert (err.value.line, err.value.field) == (lineno, field)


def run_check(*paths):
    proc = subprocess.run([sys.executable, str(ROOT / "data.py"), "check", *map(str, paths)],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def test_check_cli_reports_counts_hours_missing_audio_and_all_errors(tmp_path):
    # longer than every row
    sf.write(tmp_path / "a.wav", np.zeros(8 * 16000, dtype=np.float32), 16000)
    durations = [2.5, 7.25]
    good = write_lines(tmp_path / "good.jsonl", [ours(id=f"u{i}", audio="a.wav", duration=d)
                                                   for i, d in enumerate(durations)])
    rc, out = run_check(good)
    assert rc == 0, out
    assert "utterances: 2" in out and f"total hours: {sum(durations) / 3600:.4f}" in out
    stats = f"min {min(durations):.2f}  mean {np.mean(durations):.2f}  max {max(durations):.2f}"
    assert stats in out
    assert "audio problems: 0" in out and "field errors: 0" in out and out.strip().endswith("OK")

    bad = write_lines(tmp_path / "bad.jsonl", [
        ours(id="u0", audio="a.wav"), ours(id="u1", audio="gone.wav"), ours(id="u2", duration="x"),
        "{oops", ours(id="u0", audio="a.wav")])
    rc, out = run_check(good, bad)
    assert rc == 1
    assert "utterances: 2" in out  # bad.jsonl: u0 and u1 parse, three lines do not
    assert "audio problems: 1" in out
    assert f"{bad}:2: field 'audio': {tmp_path / 'gone.wav'}: audio file not found" in out
    assert "field errors: 3" in out
    assert f"{bad}:3: field 'duration'" in out and f"{bad}:4: field '<json>'" in out
    assert f"{bad}:5: field 'id'" in out
    assert "PROBLEMS in 1 of 2 manifest(s)" in out
