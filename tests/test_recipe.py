"""The demo corpus: eSpeak NG speech with labels true by construction, and honest splits."""
import re

import pytest
import torch

espeakng_loader = pytest.importorskip("espeakng_loader")

from data import load_audio, read_manifest  # noqa: E402
from recipe import make_corpus, tts, write_sentences  # noqa: E402
from recipe.tts import Speaker  # noqa: E402


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
    names = ("train", "valid", "test_voices", "test_sentences")
    splits = {n: read_manifest(tmp_path / f"{n}.jsonl") for n in names}
    # 24 sentences: 4 held out, 20 spoken once each; 4 of those set aside as valid; 4 per test set
    assert [len(splits[n]) for n in names] == [16, 4, 4, 4]
    seen = splits["train"] + splits["valid"]
    assert len({r.text for r in seen}) == len(seen)  # every training utterance a new sentence
    held_out = {f"{a}+{v}" for a in tts.ACCENTS for v in make_corpus.HELD_OUT_VARIANTS}
    # New voices: no held-out variant is ever heard in train/valid; both test sets use only them.
    assert not {r.extra["speaker"] for r in seen} & held_out
    for name in ("test_voices", "test_sentences"):
        assert {r.extra["speaker"] for r in splits[name]} <= held_out
    # test_voices speaks trained sentences; test_sentences only sentences training never speaks.
    assert {r.text for r in splits["test_voices"]} <= {r.text for r in splits["train"]}
    assert not {r.text for r in splits["test_sentences"]} & {r.text for r in seen}
    for r in seen + splits["test_voices"] + splits["test_sentences"]:
        variant = r.extra["speaker"].split("+")[1]
        assert r.meta["gender"] == ("male" if variant in tts.MALE_VARIANTS else "female")
        assert set(r.meta) == {"gender", "speed", "pitch"}
        wave = load_audio(r.audio)
        assert abs(wave.numel() / 16000 - r.duration) < 1e-3
    # Re-running reuses the wavs and rewrites identical manifests.
    before = (tmp_path / "test_sentences.jsonl").read_text()
    make_corpus.main(["--out", str(tmp_path), "--quick"])
    assert (tmp_path / "test_sentences.jsonl").read_text() == before


def test_every_voice_exists_with_its_gender():
    """Each accent x variant is a voice eSpeak NG knows, and the two gender lists do not overlap."""
    assert not set(tts.MALE_VARIANTS) & set(tts.FEMALE_VARIANTS)
    s = Speaker()
    for voice, _ in make_corpus.voices(False) + make_corpus.voices(True):
        assert s.say("yes", voice=voice).numel() > 0
    assert len(make_corpus.voices(True)) == len(tts.ACCENTS) * len(make_corpus.HELD_OUT_VARIANTS)


def test_pool_is_read_once_per_sentence(tmp_path):
    pool = tmp_path / "pool.txt"
    pool.write_text("a b c d.\n\nx y z w.\na b c d.\n")
    assert make_corpus.read_pool(pool) == ["a b c d.", "x y z w."]


def test_sentence_pool_is_the_grammar_output():
    """The committed pool is exactly `write_sentences.py`'s output with its defaults, and every
    sentence is one eSpeak can say in 1-6 s: 4-12 plain words, no digits or symbols."""
    pool = write_sentences.write_pool(4200, seed=0)
    assert make_corpus.read_pool(make_corpus.POOL) == pool
    assert len(set(pool)) == len(pool) == 4200
    for s in pool:
        assert write_sentences.MIN_WORDS <= len(s.split()) <= write_sentences.MAX_WORDS, s
        assert set(s) <= set("abcdefghijklmnopqrstuvwxyz ',.?"), s
        assert " a a" not in s and " a e" not in s and " a o" not in s, s  # "an" before a vowel
    # every sentence comes from a frame, and every frame is used
    def pattern(frame):  # the frame's own words literally, any words in its slots
        parts = [re.escape(part) for part in re.split(r"{\w+}", frame)]
        return re.compile("^" + ".+".join(parts).replace(r"\ a\ ", r"\ an?\ ")
                          .replace(" a ", " an? ") + "$")
    frames = [pattern(f) for f in write_sentences.FRAMES]
    assert all(any(f.match(s) for f in frames) for s in pool)
    assert all(any(f.match(s) for s in pool) for f in frames)
    # the seed decides the pool
    assert write_sentences.write_pool(50, seed=1) != pool[:50]
