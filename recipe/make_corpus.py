"""Build a synthetic speech corpus whose transcripts and speaker attributes are known exactly.

This is step 1 of the CPU demo (demo.py). AZeroS is trained on real corpora (LibriSpeech, IEMOCAP,
VoxCeleb2, ... with their metadata); offline we cannot download any of them, so we *make* speech
with eSpeak NG (recipe/tts.py): thousands of distinct sentences (recipe/sentence_pool.txt, written
by the demo's own LLM: recipe/write_sentences.py), each spoken by a voice drawn from 234 (six
English accents x 39 voice variants), at one of three speaking rates and pitches. The labels are
true by construction:

    meta = {"gender": "female", "speed": "fast", "pitch": "low"}

A projector that hears must work on sentences and voices it never trained on. Two test sets say
which is new:

    test_voices      sentences that training also speaks, in held-out voices (new voices)
    test_sentences   held-out sentences, never in training, in held-out voices (new words too)

Held-out voices are whole variants (every accent of m4, f4, Hugo, steph2); held-out sentences
are a seeded sample of the pool. Training speaks every other sentence `--voices-per-sentence`
times (distinct voices), so that the projector must learn the words, not which of a few sentences
was said.

    python -m recipe.make_corpus --out data/tts                 # ~4000 utterances, ~3 h of audio
    python -m recipe.make_corpus --out data/tts --quick         # a few dozen, for the test suite

Re-running skips wav files that already exist, and the manifests are written atomically.
"""
import argparse
import random
import sys
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from data import Record, write_manifest
from recipe.tts import ACCENTS, FEMALE_VARIANTS, MALE_VARIANTS, Speaker
from support import checks
from support.files import atomic_path

# Three levels per attribute; the numbers are eSpeak's words-per-minute and 0-100 pitch scale.
SPEEDS = {"slow": 120, "normal": 170, "fast": 230}
PITCHES = {"low": 20, "normal": 50, "high": 85}
HELD_OUT_VARIANTS = ["m4", "Hugo", "f4", "steph2"]  # two male, two female: never in training
POOL = Path(__file__).with_name("sentence_pool.txt")


def voices(held_out: bool) -> list[tuple[str, str]]:
    """(eSpeak voice name, gender) for every accent x variant, training or held-out ones."""
    out = []
    for variants, gender in ((MALE_VARIANTS, "male"), (FEMALE_VARIANTS, "female")):
        out += [(f"{accent}+{v}", gender) for accent in ACCENTS for v in variants
                if (v in HELD_OUT_VARIANTS) == held_out]
    return out


def item(text: str, s: int, voice: tuple[str, str], rng: random.Random, tag: str) -> dict:
    name, gender = voice
    speed, pitch = rng.choice(list(SPEEDS)), rng.choice(list(PITCHES))
    uid = f"tts_{tag}_{s:05d}_{name.replace('+', '_')}_{speed}_{pitch}"
    return dict(id=uid, text=text, voice=name,
                meta={"gender": gender, "speed": speed, "pitch": pitch})


def plan(sentences: list[str], held_out: set[int], train_sentences: int,
         voices_per_sentence: int, test_rows: int, valid: int,
         seed: int) -> dict[str, list[dict]]:
    """Which sentence is spoken by which voice, per split. Sentence order is the pool's, so a
    larger --train-sentences extends a smaller one. `valid` training utterances are set aside
    first, so that every test_voices sentence is one that training really speaks."""
    rng = random.Random(seed)
    train_voices, test_voices = voices(held_out=False), voices(held_out=True)
    trained = [s for s in range(len(sentences)) if s not in held_out][:train_sentences]
    train = [item(sentences[s], s, voice, rng, "train")
             for s in trained for voice in rng.sample(train_voices, voices_per_sentence)]
    rng.shuffle(train)
    splits = {"valid": train[:valid], "train": train[valid:]}
    spoken = sorted({it["text"] for it in splits["train"]})
    splits["test_voices"] = [item(text, sentences.index(text), rng.choice(test_voices), rng, "tv")
                             for text in rng.sample(spoken, min(test_rows, len(spoken)))]
    splits["test_sentences"] = [item(sentences[s], s, rng.choice(test_voices), rng, "ts")
                                for s in sorted(held_out)[:test_rows]]
    return splits


def synthesise(items: list[dict], out_dir: Path, speaker: Speaker) -> list[Record]:
    """Write one 16 kHz wav per item (skipping existing files) and return their Records."""
    wav_dir = out_dir / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for it in tqdm(items, desc="synthesising speech", unit="utt"):
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
        out.append(Record(id=it["id"], audio=str(path.resolve()), duration=round(duration, 4),
                          text=it["text"], language="en", meta=dict(it["meta"]),
                          extra={"speaker": it["voice"]}))
    return out


def read_pool(path) -> list[str]:
    """The sentences, one per line, each once (a repeated line would leak into the test sets)."""
    seen, out = set(), []
    for line in Path(path).read_text().splitlines():
        s = line.strip()
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (wavs/ and the manifests)")
    p.add_argument("--sentences", default=str(POOL), help="one sentence per line")
    p.add_argument("--train-sentences", type=int, default=100_000,
                   help="distinct training sentences (default: every one not held out)")
    p.add_argument("--voices-per-sentence", type=int, default=1)
    p.add_argument("--held-out-sentences", type=int, default=200,
                   help="sentences never in training (a seeded sample of the pool)")
    p.add_argument("--test-rows", type=int, default=64, help="utterances per test set")
    p.add_argument("--valid", type=int, default=32, help="utterances moved from train to valid")
    p.add_argument("--quick", action="store_true", help="24 sentences, for tests")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    sentences = read_pool(args.sentences)
    if args.quick:
        sentences = sentences[:24]
        args.held_out_sentences, args.test_rows, args.valid = 4, 4, 4
    if args.held_out_sentences >= len(sentences):
        raise checks.CheckError(f"--held-out-sentences {args.held_out_sentences}: the pool "
                                f"{args.sentences} has only {len(sentences)} sentences")
    held_out = set(random.Random(args.seed).sample(range(len(sentences)),
                                                   args.held_out_sentences))
    items = plan(sentences, held_out, args.train_sentences, args.voices_per_sentence,
                 args.test_rows, args.valid, args.seed)
    out_dir, speaker = Path(args.out), Speaker()
    splits = {name: synthesise(its, out_dir, speaker) for name, its in items.items()}
    for name, recs in splits.items():
        path = out_dir / f"{name}.jsonl"
        write_manifest(sorted(recs, key=lambda r: r.id), path, relative=True)
        minutes = sum(r.duration for r in recs) / 60
        print(f"{name:14s}: {len(recs):5d} utterances, {minutes:6.1f} min -> {path}")
    return splits


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
