"""The demo corpus: eSpeak NG speech with labels true by construction, and honest splits."""
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "recipe"))
espeakng_loader = pytest.importorskip("espeakng_loader")

import make_corpus  # noqa: E402
from data import load_audio, read_manifest  # noqa: E402
from tts import Speaker  # noqa: E402


def test_rate_and_pitch_change_the_audio():
    s = Speaker()
    text = "the train to the city leaves at half past seven"
    slow, fast = s.say(text, rate=120), s.say(text, rate=230)
    assert slow.dtype == torch.float32 and slow.abs().max() <= 1.0
    # Duration scales roughly with 1/rate (eSpeak keeps pauses, so allow slack): 230/120 = 1.9.
    assert 1.5 < slow.numel() / fast.numel() < 2.3
    with pytest.raises(ValueError, match="no voice"):
        s.say(text, voice="xx+nonexistent")


def test_quick_corpus_splits_and_labels(tmp_path):
    make_corpus.main(["--out", str(tmp_path), "--quick"])
    splits = {n: read_manifest(tmp_path / f"{n}.jsonl") for n in ("train", "valid", "test")}
    # 4 voices x 12 sentences
    assert [len(splits[n]) for n in ("train", "valid", "test")] == [14, 4, 30]
    seen = splits["train"] + splits["valid"]
    # Held out: no test-only voice or sentence ever appears in train/valid.
    assert not {r.extra["speaker"] for r in seen} & set(make_corpus.HELD_OUT_VOICES)
    assert not {r.text for r in seen} & {r.text for r in splits["test"] if r.extra["speaker"] not in
                                          make_corpus.HELD_OUT_VOICES}
    for r in seen + splits["test"]:
        assert r.meta["gender"] == ("male" if "+m" in r.extra["speaker"] else "female")
        assert set(r.meta) == {"gender", "speed", "pitch"}
        wave = load_audio(r.audio)
        assert abs(wave.numel() / 16000 - r.duration) < 1e-3
    # Re-running reuses the wavs and rewrites identical manifests.
    before = (tmp_path / "test.jsonl").read_text()
    make_corpus.main(["--out", str(tmp_path), "--quick"])
    assert (tmp_path / "test.jsonl").read_text() == before
