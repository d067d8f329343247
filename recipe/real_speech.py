"""Real human speech for the held-out evaluation: the Asterisk telephony prompts (Debian packages).

Everything else in the CPU demo hears eSpeak NG, a formant synthesiser. The paper evaluates on real
recordings, so the demo adds one real-speech test set that installs offline: Asterisk's English core
sounds, 568 studio prompts ("Please enter your password followed by the pound key.") read by one US
female speaker, Allison Smith (CC-BY-SA-3.0), as 8 kHz 16-bit wavs. The transcripts are a separate
text file in the documentation package:

    apt-get install asterisk-core-sounds-en-wav asterisk-core-sounds-en

    /usr/share/asterisk/sounds/en_US_f_Allison/<name>.wav             the recordings (wav package)
    /usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz      "<name>: <transcript>" lines

Bracketed notes are not speech: "[sound of monkeys screaming]" prompts are dropped and "at [@]"
keeps "at". The recordings are read with data.load_audio, which resamples them to 16 kHz
(data.resample); the telephone band (up to 4 kHz) is all they contain. They never enter training:
the speaker and the sentences are both unseen by the demo's encoders and projectors.

    python -m recipe.real_speech --out data/real/test.jsonl     # the manifest (gender: female)
"""

import argparse
import gzip
import re
import sys
from pathlib import Path

from data import Record, load_audio, write_manifest
from support import checks

SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
PACKAGES = "asterisk-core-sounds-en-wav asterisk-core-sounds-en"
INSTALL = f"sudo apt-get install {PACKAGES}"
SPEAKER = {"gender": "female"}  # one speaker, Allison Smith


class NotInstalled(checks.CheckError):
    """The Debian packages are missing; the message says how to install them."""


def read_transcripts(path=TRANSCRIPTS) -> dict[str, str]:
    """core-sounds-en.txt(.gz) -> {prompt name: transcript}. ';' lines are comments."""
    path = Path(path)
    if not path.exists():
        raise NotInstalled(
            f"{path} not found: {INSTALL} (and keep /usr/share/doc: some minimal images "
            "exclude it in /etc/dpkg/dpkg.cfg.d)"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    out = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.startswith(";"):
            continue
        name, sep, text = line.partition(":")
        if not sep or not name.strip() or " " in name.strip():
            raise ValueError(f"{path}:{lineno}: expected '<name>: <transcript>', got {line[:60]!r}")
        text = " ".join(re.sub(r"\[[^\]]*\]", " ", text).split())  # drop bracketed non-speech notes
        if text:
            out[name.strip()] = text
    return out


def records(sounds=SOUNDS, transcripts=TRANSCRIPTS, min_words: int = 1) -> list[Record]:
    """One Record per prompt that has both a wav and a spoken transcript of at least `min_words`
    words, sorted by id."""
    import soundfile as sf

    sounds = Path(sounds)
    if not sounds.is_dir():
        raise NotInstalled(f"{sounds} not found: {INSTALL}")
    found = [(name, text, sounds / f"{name}.wav")
             for name, text in sorted(read_transcripts(transcripts).items())
             if (sounds / f"{name}.wav").exists()]
    if not found:
        raise NotInstalled(f"no wav in {sounds} matches a transcript of {transcripts}: {INSTALL}")
    # the word filter before sf.info: a prompt too short to keep never has its header read
    return [Record(id="asterisk_" + name.replace("/", "_"), audio=str(wav),
                   duration=round(sf.info(str(wav)).duration, 4), text=text, language="en",
                   meta=dict(SPEAKER), extra={"speaker": "asterisk-allison"})
            for name, text, wav in found if len(text.split()) >= min_words]


def load(record: Record):
    """16 kHz float32 waveform (the 8 kHz file resampled by data.load_audio)."""
    return load_audio(record.audio)


def main(argv=None) -> list[Record]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="manifest to write (absolute audio paths)")
    p.add_argument(
        "--min-words", type=int, default=1, help="keep prompts with at least this many words"
    )
    args = p.parse_args(argv)
    recs = records(min_words=args.min_words)
    write_manifest(recs, args.out)
    minutes = sum(r.duration for r in recs) / 60
    print(f"{len(recs)} real recordings, {minutes:.1f} min -> {args.out}")
    return recs


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
