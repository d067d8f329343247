"""Real human speech (the Asterisk prompts): transcript parsing, pairing with wavs, 8 -> 16 kHz
loading."""

import math

import numpy as np
import pytest
import soundfile as sf

from recipe import real_speech


def test_transcripts_parse_brackets_comments_and_bad_lines(tmp_path):
    path = tmp_path / "core-sounds-en.txt"
    path.write_text(
        "; Core sounds\n\nbeep: [this is a simple beep tone]\nletters/at: at [@]\n"
        "agent-pass: Please enter your password  followed by the pound key.\n"
    )
    assert real_speech.read_transcripts(path) == {
        "letters/at": "at",
        "agent-pass": "Please enter your password followed by the pound key.",
    }
    path.write_text("ok: Fine.\nno colon here\n")
    with pytest.raises(ValueError, match=r"core-sounds-en\.txt:2: expected '<name>: <transcript>'"):
        real_speech.read_transcripts(path)
    with pytest.raises(
        real_speech.NotInstalled, match="apt-get install asterisk-core-sounds-en-wav"
    ):
        real_speech.read_transcripts(tmp_path / "missing.txt.gz")


def test_records_pair_wavs_with_transcripts_and_load_at_16k(tmp_path):
    (tmp_path / "digits").mkdir()
    for name, seconds in (("hello", 0.5), ("digits/1", 0.25), ("no-transcript", 0.1)):
        sf.write(
            str(tmp_path / f"{name}.wav"),
            np.zeros(int(8000 * seconds), np.int16),
            8000,
            subtype="PCM_16",
        )
    text = tmp_path / "t.txt"
    text.write_text("hello: Hello there.\ndigits/1: One.\nmissing-wav: Gone.\n")
    recs = real_speech.records(tmp_path, text)
    assert [(r.id, r.text, r.duration) for r in recs] == [
        ("asterisk_digits_1", "One.", 0.25),
        ("asterisk_hello", "Hello there.", 0.5),
    ]
    assert all(r.meta == {"gender": "female"} for r in recs)
    assert real_speech.load(recs[1]).shape == (8000,)  # 4000 samples at 8 kHz -> 8000 at 16 kHz
    with pytest.raises(real_speech.NotInstalled, match="apt-get install"):
        real_speech.records(tmp_path / "nowhere", text)


def test_installed_asterisk_prompts():
    try:
        recs = real_speech.records()
    except real_speech.NotInstalled as e:
        pytest.skip(f"{e}")
    assert len(recs) > 500  # 568 prompts, minus tones and prompts without a recording
    by_id = {r.id: r for r in recs}
    rec = by_id["asterisk_agent-loginok"]
    assert rec.text == "Agent logged in."
    assert sf.info(rec.audio).samplerate == 8000
    wave = real_speech.load(rec)
    assert wave.shape[0] == math.ceil(sf.info(rec.audio).frames * 2)  # resampled to 16 kHz
    assert 0.01 < wave.abs().max() <= 1.0  # speech, not silence
