"""Evaluation (AZeroS paper, Sec. 5): how text-like the audio looks to the frozen LLM, and zero-shot
answers (Sec. 5.2 benchmarks, Sec. 5.5 text-only upper bound; the objective is Sec. 3.4, Eq. 2-3).

AZeroS trains only the projectors, with one objective (SIFT): to the frozen LLM, the projected audio
h(x) should be as good as the oracle text of the same utterance (its transcript, plus `<meta>`
attributes in stage 2), measured as the cross-entropy of the target y that the LLM itself generated
from that text. So evaluation asks two questions.

1. `align` -- the training objective itself, on held-out utterances: the mean per-token CE of each
   self-generated target given the audio (the prompt the model was trained with) and given the
   oracle text (the LLM's own input), and their ratio, per target-generation mode. 1.0 means the
   audio is, to the LLM, as good as reading the text (`oracle_segments`, the text's own embeddings
   in place of the audio, gives exactly 1: the tests' self-check).
2. zero-shot tasks, never seen in training (Sec. 5.2; the text instruction follows the audio):
   - `mcq`    AIR-Bench Foundation multiple choice with the paper's fixed option prompt
              (eval_support.OPTION_PROMPT); accuracy per task field, unparseable answers counted;
   - `open`   open questions (VoiceBench, AIR-Bench Chat): answers written to JSONL for an external
              judge (the paper used GPT-4o; no judge is called here);
   - `label`  attribute questions built from manifest metadata (gender, age, emotion, language),
              scored by matching the answer to the label vocabulary;
   - `choice` candidate answers scored by likelihood instead of generation (small LMs often ramble
              or always name the same option); two-choice tasks also get the AUC of the log-odds:
              does the answer lean with the audio at all, whatever the LLM's prior for one option.

Every task runs three "systems" on the same questions:
    audio   the speech LLM on the real audio;
    oracle  the frozen LLM reading the oracle text (transcript + metadata, exactly what SIFT
            imitates): the cascade upper bound the projectors can at best reach;
    silent  the speech LLM on silence of the same length: the floor (the LLM's guess from the
            question alone, or the prior of the target).

    python evaluate.py --model DIR --manifest held_out.jsonl --task align|mcq|open|label|choice
writes to --out `{task}_answers.jsonl` (one line per question and system, appended per batch, so an
interrupted run resumes where it stopped), `{task}_results.json` and `{task}_results.md`.

Support (not the method): support/eval_support.py parses and scores answers, reads task files,
keeps the answer files.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("MKL_DYNAMIC", "FALSE")  # before torch loads MKL (train.py says why)

import torch
from tqdm import tqdm

import data
from generate_targets import build_prompt
from support import checks, eval_support, files, model_support
from support.eval_support import Item

SYSTEMS = ("audio", "oracle", "silent")
TASKS = ("align", "mcq", "open", "label", "choice")


# --------------------------------------------------------------------------------------------------
# 1. Alignment (the SIFT objective): CE of the self-generated target, audio vs oracle text


def align_records(records: list[data.Record]) -> list[data.Record]:
    """Records that carry a self-generated target (generate_targets.py output)."""
    return [r for r in records if r.response is not None and r.mode]


def oracle_user_text(record: data.Record) -> str:
    """The LLM's own input for this target (generate_targets' `input_text`). tsit_s ran no LLM
    (its target is the transcript): there the transcript plus the ASR instruction stands for it."""
    if record.mode == "tsit_s" or record.input_text is None:
        text = record.input_text
        if text is None:
            text = build_prompt(record, "sift_s").input_text
        return f"{text} {record.instruction or ''}".strip()
    return record.input_text


def oracle_training_messages(record: data.Record) -> list[dict]:
    """The text counterpart of model.training_messages: the LLM's own input and its answer, in the
    training template. No system turn, also for `_ssp` rows: training has none (the dialog system
    message only shaped the target), so the oracle is scored on the same turns as the audio."""
    return [{"role": "user", "content": oracle_user_text(record)},
            {"role": "assistant", "content": record.response, "truncated": bool(record.truncated)}]


@torch.no_grad()
def target_nll(model, messages: list[list[dict]], waves=None,
               segments=None) -> list[tuple[float, int]]:
    """(summed NLL, number of target tokens) per row: model.forward's row_nll / row_tokens, on
    waveforms, on ready-made frames (oracle_segments), or on a text-only prompt (the oracle)."""
    with model.autocast():  # the training precision (bf16 on CUDA)
        if waves is not None:
            out = model.forward(messages, model.features(waves))
        else:
            out = model.forward(messages, segments=segments)
    return [(float(s), int(n)) for s, n in zip(out["row_nll"].tolist(), out["row_tokens"].tolist())]


def oracle_segments(model, records: list[data.Record]) -> list[list[torch.Tensor]]:
    """The oracle text's own token embeddings, cut into the pieces the audio replaces: what a
    perfect projector would emit. Fed in place of the audio, the audio prompt *is* the text prompt,
    so the alignment ratio must be 1: a self-check of the whole measurement (the tests use it).

    Exact where the tokenizer splits the text prompt at the same places as the audio prompt around
    `<|AUDIO|>` (it does for these prompts with the test tokenizer; a BPE merge across a
    `<meta>`/`<text>` boundary would change a token or two)."""
    embed = model.llm.get_input_embeddings()
    out = []
    for r in records:
        text = oracle_user_text(r)
        if r.instruction and text.endswith(r.instruction):
            text = text[: -len(r.instruction)].rstrip()
        m = re.fullmatch(r"<audio><meta>(.*)</meta><text>(.*)</text></audio>", text, flags=re.S)
        pieces = [m.group(1), m.group(2)] if m else [text]
        if not model.use_paraling:
            pieces = pieces[-1:]
        ids = [torch.tensor(model.tokenizer.encode(p, add_special_tokens=False), dtype=torch.long,
                            device=embed.weight.device) for p in pieces]
        out.append([embed(i) for i in ids])
    return out


def run_align(model, records: list[data.Record], path: Path, model_name: str, systems,
              batch_size: int, segments_fn=None) -> dict:
    """Per (record, system) the target's summed NLL and token count, appended after every batch.

    audio/silent use the prompt the model is trained with (model.training_messages); `segments_fn`
    (model, records -> per-row frame lists) replaces the audio's frames, e.g. oracle_segments."""
    done = eval_support.load_done(path, model_name)
    for system in systems:
        todo = sorted([r for r in records if (r.id, system) not in done], key=lambda r: -r.duration)
        for chunk in tqdm(list(eval_support.batches(todo, batch_size)), desc=system, unit="batch",
                          disable=not todo):
            if system == "oracle":
                scores = target_nll(model, [oracle_training_messages(r) for r in chunk])
            else:
                audio_messages = [model.training_messages(r) for r in chunk]
                if system == "audio" and segments_fn is not None:
                    segments = segments_fn(model, chunk)
                    scores = target_nll(model, audio_messages, segments=segments)
                else:
                    waves = load_waves(chunk, silent=system == "silent")
                    scores = target_nll(model, audio_messages, waves=waves)
            rows = [{"id": r.id, "system": system, "model": model_name, "mode": r.mode,
                     "nll": s, "tokens": n} for r, (s, n) in zip(chunk, scores)]
            files.append_jsonl(path, rows)
            done.update({(row["id"], row["system"]): row for row in rows})
    return done


def summarize_align(records: list[data.Record], done: dict, systems) -> dict:
    """Per mode (and "all"): mean CE per target token for each system, audio / text, silent / text.

    Token-weighted (summed NLL over summed tokens), like the training loss, so long targets count by
    their length. Every system scores the same target tokens: the ratio compares like with like."""
    nll, tokens, counts = defaultdict(float), defaultdict(int), defaultdict(int)
    for r in records:
        for mode in (r.mode, "all"):
            counts[mode] += 1
            for system in systems:
                if (row := done.get((r.id, system))) is not None:
                    nll[mode, system] += row["nll"]
                    tokens[mode, system] += row["tokens"]
    out = {}
    for mode in sorted(counts, key=lambda m: (m == "all", m)):
        ce = {s: nll[mode, s] / tokens[mode, s] for s in systems if tokens[mode, s]}
        entry = {"n": counts[mode], "tokens": max(tokens[mode, s] for s in systems), "ce": ce}
        for s in ("audio", "silent"):
            if s in ce and ce.get("oracle"):
                entry[f"ratio_{s}"] = ce[s] / ce["oracle"]
        out[mode] = entry
    return out


# --------------------------------------------------------------------------------------------------
# 2. Zero-shot tasks: the three systems answer every question
#
# All three go through model.generate (inference chat template, left padding, greedy decoding), so
# the only difference between them is what stands where the audio goes: projected frames of the
# clip, projected frames of silence, or the oracle text itself. For `label` the oracle text holds
# the metadata, i.e. the answer: its score checks the question and the parser more than it bounds
# anything (language excepted).


def oracle_text(model, record: data.Record) -> str | None:
    """The text the audio stands for, built exactly as target generation builds the SIFT input: the
    transcript (speech branch only) or `<audio><meta>k: v</meta><text>transcript</text></audio>`
    (both branches). None when the row has no transcript: no upper bound for it."""
    if not record.text:
        return None
    return build_prompt(record, "sift_sp" if model.use_paraling else "sift_s").input_text


def load_waves(records: list[data.Record], silent: bool) -> list[torch.Tensor]:
    """The clips of a batch. Silence keeps each clip's length, so the prompt has as many audio
    frames as the real clip and only the content differs."""
    waves = []
    for r in records:
        wave = data.load_audio(r.audio, r.offset, r.duration or None, r.channel)
        waves.append(torch.zeros_like(wave) if silent else wave)
    return waves


def user_turn(model, item: Item, system: str) -> dict:
    """The question as the user asks it: after the audio, or after the oracle text for it."""
    if system == "oracle":
        text = f"{oracle_text(model, item.record)} {item.question}"
        return model.user_message(text, with_audio=False)
    return model.user_message(item.question)


@torch.no_grad()
def answer_batch(model, items: list[Item], system: str, max_new_tokens: int) -> list[str]:
    """Greedy answers of one system to a batch of items, all through model.generate (same template,
    padding and decoding): only what stands where the audio goes differs."""
    from llm import GenerationOptions

    messages = [[user_turn(model, it, system)] for it in items]
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    if system == "oracle":
        return model.generate(None, messages, options)
    waves = load_waves([it.record for it in items], silent=system == "silent")
    return model.generate(waves, messages, options)


@torch.no_grad()
def choice_nll(model, items: list[Item], system: str) -> list[list[float]]:
    """Summed NLL of every candidate answer of every item under one system (teacher-forced, the
    training template): one row per (item, candidate); the encoders run once per clip, not once
    per candidate."""
    counts = [len(it.fields["choices"]) for it in items]
    messages = [[user_turn(model, it, system), {"role": "assistant", "content": c}]
                for it in items for c in it.fields["choices"]]
    with model.autocast():  # the training precision (bf16 on CUDA)
        if system == "oracle":
            out = model.forward(messages)
        else:
            waves = load_waves([it.record for it in items], silent=system == "silent")
            enc = model.encode(model.features(waves))
            row = torch.tensor([i for i, n in enumerate(counts) for _ in range(n)])  # -> its clip
            enc = {b: (x[row.to(x.device)], lens[row.to(lens.device)])
                   for b, (x, lens) in enc.items()}
            out = model.forward(messages, encoder_outputs=enc)
    nll, per_item, start = out["row_nll"].tolist(), [], 0
    for n in counts:
        per_item.append(nll[start: start + n])
        start += n
    return per_item


# --------------------------------------------------------------------------------------------------
# 3. Scores of the likelihood choice (the generated answers' scorers are in eval_support)


def summarize_choice(rows: dict[str, list[dict]]) -> dict[str, dict]:
    """Per system and task (and "all"): accuracy of the most likely candidate; for two-choice groups
    the AUC of the log-odds log p(choice 1) - log p(choice 0) against "the answer is choice 1"
    (accuracy can sit at the majority share when the LLM always prefers one option; the AUC still
    shows whether the audio moves it); and how often the system picks what the oracle text picks."""
    def pick(row):  # the most likely candidate
        return min(range(len(row["nll"])), key=row["nll"].__getitem__)

    oracle_pick = {r["id"]: pick(r) for r in rows.get("oracle", [])}
    out = {}
    for system, rs in rows.items():
        out[system] = {}
        for g, grs in eval_support.grouped(rs, "task"):
            picks = [pick(r) for r in grs]
            right = sum(p == r["answer"] for p, r in zip(picks, grs))
            entry = {"n": len(grs), "accuracy": 100.0 * right / len(grs)}
            if all(len(r["nll"]) == 2 for r in grs):
                log_odds = [r["nll"][0] - r["nll"][1] for r in grs]
                entry["auc"] = 100.0 * eval_support.auc(log_odds, [r["answer"] == 1 for r in grs])
            both = [(p, oracle_pick[r["id"]]) for p, r in zip(picks, grs) if r["id"] in oracle_pick]
            if system != "oracle" and both:
                entry["agrees_with_oracle"] = 100.0 * sum(a == b for a, b in both) / len(both)
            out[system][g] = entry
    return out


# --------------------------------------------------------------------------------------------------
# 4. Putting it together


def evaluate(model, task: str, manifest, out, *, model_name: str = "model", batch_size: int = 8,
             max_new_tokens: int = 200, systems=SYSTEMS, limit: int | None = None,
             segments_fn=None) -> dict:
    """Run one task end to end with an already loaded model; returns the results (also written)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{task}_answers.jsonl"
    results = {"task": task, "model": model_name, "manifest": str(manifest), "systems": {}}
    if task == "align":
        records = align_records(data.read_manifest(manifest))[:limit]
        if not records:
            raise checks.CheckError(f"{manifest}: no record has a self-generated target "
                             "(mode + response); run generate_targets.py first")
        # one run per answer file (eval_support.run_items locks too)
        with checks.exclusive_lock(path):
            done = run_align(model, records, path, model_name, systems, batch_size, segments_fn)
        results.update(systems=list(systems), modes=summarize_align(records, done, systems))
    elif task == "choice":
        items = eval_support.read_choice(manifest)[:limit]
        def score(chunk, system):
            return [{"nll": nll} for nll in choice_nll(model, chunk, system)]
        done = eval_support.run_items(items, path, model_name, systems, batch_size, score)
        rows = {s: [done[it.id, s] for it in items if (it.id, s) in done] for s in systems}
        results["systems"] = summarize_choice(rows)
    elif task in ("mcq", "open", "label"):
        if task == "mcq":
            items, score_row = eval_support.read_mcq(manifest), eval_support.score_mcq_row
        elif task == "open":
            items, score_row = eval_support.read_open(manifest), eval_support.score_open_row
        else:
            items = eval_support.label_items(data.read_manifest(manifest))
            score_row = eval_support.score_label_row
        items = items[:limit]
        def generate(chunk, system):
            answers = answer_batch(model, chunk, system, max_new_tokens)
            return [{"response": a, **score_row(it.fields, a)} for it, a in zip(chunk, answers)]
        done = eval_support.run_items(items, path, model_name, systems, batch_size, generate)
        for system, rows in eval_support.rescore(items, done, systems, score_row).items():
            if task == "open":
                results["systems"][system] = eval_support.summarize_open(rows)
                eval_support.write_judge_file(out / f"open_{system}.jsonl", rows)
            else:
                group = "task" if task == "mcq" else "attribute"
                results["systems"][system] = eval_support.accuracy_table(rows, group)
    else:
        raise ValueError(f"unknown task {task!r}; one of {TASKS}")
    eval_support.write_results(out, task, results)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="model folder in the release layout (model.py)")
    p.add_argument("--manifest", required=True,
                   help="held-out manifest (align, label) or task JSONL (mcq, open, choice)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", default=None, help="output folder (default: eval/<task>)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=200, help="official evaluation: 200")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of audio,oracle,silent")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N questions (quick look)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when it works; a large "
                   "model on a CPU needs --device cpu)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="autocast of encoders and projectors, as in training (auto: bf16 on CUDA, "
                        "fp32 on CPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="LLM dtype (default: the checkpoint's on CUDA, float32 on CPU)")
    p.add_argument("--max-audio-seconds", type=float, default=checks.MAX_AUDIO_SECONDS,
                   help=checks.MAX_AUDIO_HELP)
    args = p.parse_args(argv)
    checks.positive_flags(p, args, "max_new_tokens", "batch_size", "limit",
                          non_negative=("max_audio_seconds",))
    return args


def main(argv=None) -> dict:
    """Answer and score one task; print its table and return the results."""
    args = parse_args(argv)
    checks.files_exist([args.manifest], "--manifest")  # these three before the model loads
    device = checks.pick_device(args.device)  # never a silent CPU run of a 7B model
    checks.cpu_fallback(model_support.release_llm_parameters(args.model), args.device, device,
                        f"--model {args.model}")
    checks.manifest_audio(eval_support.task_audio(args.task, args.manifest), args.manifest,
                          args.max_audio_seconds)
    from model import AZeroS

    systems = [s for s in args.systems.split(",") if s]
    if not set(systems) <= set(SYSTEMS):
        raise checks.CheckError(f"--systems: unknown system in {args.systems!r}; "
                                f"use {','.join(SYSTEMS)}")
    out = Path(args.out or Path("eval") / args.task)
    if out.is_dir():  # another run on this --out is named before the model loads, not after
        with checks.exclusive_lock(out / f"{args.task}_answers.jsonl"):
            pass
    dtype = getattr(torch, args.dtype) if args.dtype else None  # None: model.py's device default
    model = AZeroS.from_pretrained(args.model, device=device, dtype=dtype,
                                   precision=args.precision)
    model.eval()
    results = evaluate(model, args.task, args.manifest, out,
                       model_name=str(Path(args.model).resolve()), batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, systems=systems, limit=args.limit)
    print(eval_support.markdown_table(args.task, results), end="")
    print(f"written: {out / (args.task + '_results.json')}, {out / (args.task + '_results.md')}")
    return results


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
