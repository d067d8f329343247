"""Build a small synthetic speech corpus whose transcripts and speaker attributes are known exactly.

This is step 1 of the CPU demo (demo.py). AZeroS is trained on real corpora (LibriSpeech, IEMOCAP,
VoxCeleb2, ... with their metadata); offline we cannot download any of them, so we *make* speech
with eSpeak NG (recipe/tts.py): every sentence of recipe/sentences.txt spoken by several voices,
each utterance with a speaking rate and a pitch drawn from three levels. The labels are true by
construction:

    meta = {"gender": "female", "speed": "fast", "pitch": "low"}

Held-out evaluation data must be unseen in two ways, as in the paper's zero-shot tests: some
*voices* never occur in training, and some *sentences* never occur in training. The test set is
every utterance with a held-out voice or a held-out sentence; the rest is split into train and a
small valid set.

    python recipe/make_corpus.py --out data/tts            # ~1000 utterances, ~45 min of audio
    python recipe/make_corpus.py --out data/tts --quick    # a few dozen, for the test suite

Re-running skips wav files that already exist, and the manifests are written atomically.
"""
import argparse
import random
import sys
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's flat modules
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import Record, write_manifest  # noqa: E402
from files import atomic_path  # noqa: E402
from tts import FEMALE_VOICES, MALE_VOICES, Speaker  # noqa: E402

# Three levels per attribute; the numbers are eSpeak's words-per-minute and 0-100 pitch scale.
SPEEDS = {"slow": 120, "normal": 170, "fast": 230}
PITCHES = {"low": 20, "normal": 50, "high": 85}
HELD_OUT_VOICES = ["en+m4", "en+f4"]  # one male, one female voice never heard in training


def plan(sentences: list[str], voices: list[str], held_out_sentences: set[int], seed: int):
    """Every (voice, sentence) pair once, with a seeded speed and pitch. Returns (split, item)
    pairs."""
    rng = random.Random(seed)
    items = []
    for voice in voices:
        gender = "male" if voice in MALE_VOICES else "female"
        for s, text in enumerate(sentences):
            speed, pitch = rng.choice(list(SPEEDS)), rng.choice(list(PITCHES))
            uid = f"tts_{voice.replace('+', '-')}_{s:03d}_{speed}_{pitch}"
            held_out = voice in HELD_OUT_VOICES or s in held_out_sentences
            meta = {"gender": gender, "speed": speed, "pitch": pitch}
            item = dict(id=uid, text=text, voice=voice, meta=meta)
            items.append(("test" if held_out else "train", item))
    return items


def synthesise(items, out_dir: Path, speaker: Speaker) -> list[tuple[str, Record]]:
    """Write one 16 kHz wav per item (skipping existing files) and return (split, Record) pairs."""
    wav_dir = out_dir / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for split, it in tqdm(items, desc="synthesising speech", unit="utt"):
        path = wav_dir / f"{it['id']}.wav"
        if path.exists():
            duration = sf.info(str(path)).duration
        else:
            meta = it["meta"]
            wave = speaker.say(it["text"], voice=it["voice"], rate=SPEEDS[meta["speed"]],
                               pitch=PITCHES[meta["pitch"]])
            # atomic: a killed run never leaves a truncated wav that a re-run would trust
            with atomic_path(path, f"writing {path}") as tmp:
                sf.write(str(tmp), wave.numpy(), speaker.sample_rate, subtype="PCM_16",
                         format="WAV")
            duration = wave.numel() / speaker.sample_rate
        rec = Record(id=it["id"], audio=str(path.resolve()), duration=round(duration, 4),
                     text=it["text"], language="en", meta=dict(it["meta"]),
                     extra={"speaker": it["voice"]})
        out.append((split, rec))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (wavs/ and train/valid/test.jsonl)")
    p.add_argument("--sentences", default=str(Path(__file__).with_name("sentences.txt")))
    p.add_argument("--quick", action="store_true", help="4 voices x 12 sentences, for tests")
    p.add_argument("--held-out-sentences", type=int, default=15,
                   help="last N sentences are test-only")
    p.add_argument("--valid", type=int, default=32, help="utterances moved from train to valid")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    sentences = [s.strip() for s in Path(args.sentences).read_text().splitlines() if s.strip()]
    voices = MALE_VOICES + FEMALE_VOICES
    if args.quick:
        sentences, voices = sentences[:12], ["en+m1", "en+m4", "en+f1", "en+f4"]
        args.held_out_sentences, args.valid = 3, 4
    held_out = set(range(len(sentences) - args.held_out_sentences, len(sentences)))

    out_dir = Path(args.out)
    pairs = synthesise(plan(sentences, voices, held_out, args.seed), out_dir, Speaker())
    train = [r for s, r in pairs if s == "train"]
    test = [r for s, r in pairs if s == "test"]
    random.Random(args.seed).shuffle(train)
    valid, train = train[: args.valid], train[args.valid:]
    for name, recs in (("train", train), ("valid", valid), ("test", test)):
        path = out_dir / f"{name}.jsonl"
        write_manifest(sorted(recs, key=lambda r: r.id), path, relative=True)
        hours = sum(r.duration for r in recs) / 3600
        print(f"{name:5s}: {len(recs):5d} utterances, {hours * 60:6.1f} min -> {path}")


if __name__ == "__main__":
    main()
