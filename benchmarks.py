"""The paper's benchmarks end to end (AZeroS paper, Sec. 5.2, Tables 4-5): answer VoiceBench and
AIR-Bench with a model folder, score them with the official rules, and print the paper's columns.

    python benchmarks.py voicebench          --model DIR --data VOICEBENCH_DIR --out RUN
    python benchmarks.py airbench-foundation --model DIR --data AIR_BENCH_DIR  --out RUN
    python benchmarks.py airbench-chat       --model DIR --data AIR_BENCH_DIR  --out RUN
    python benchmarks.py score   --out RUN [--judge-url http://127.0.0.1:8000/v1 --judge-model NAME]
    python benchmarks.py summary RUN [RUN ...]

Answering is greedy through model.py with each benchmark's own prompt: VoiceBench gets the audio
alone (the question is spoken), AIR Foundation the official instruction + question + lettered
options + AZeroS's "only output the option" line, AIR Chat the audio + question. Answers are
appended per batch to RUN/<benchmark>/answers.jsonl (eval_support.run_items): a killed run resumes
without answering anything twice.

`score` runs the offline scorers, asks an OpenAI-compatible judge (a vLLM server, say) for the
judged columns when --judge-url is given (its raw outputs are kept in RUN/judge/, resumable too),
and writes RUN/summary.json and RUN/summary.md in the paper's column order with a list of
deviations.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MKL_DYNAMIC", "FALSE")  # before torch loads MKL (train.py says why)

import data
from paper_benchmarks import bench_data, bench_scoring
from support import checks, eval_support, files

DEFAULT_MAX_NEW_TOKENS = 1024  # the paper does not say; the official VoiceBench wrappers allow 2048
OFFICIAL_JUDGES = {"voicebench": "gpt-4o-mini", "air_chat": "gpt-4-0125-preview"}
PAPER_JUDGES = {
    "voicebench": "gpt-4o-2025-01-01-preview",
    "air_chat": "gpt-4-turbo-2025-01-01-preview",
}
# VoiceBench's judge call (api_judge.py): 3 samples per item
VOICEBENCH_JUDGE = {
    "n": 3,
    "temperature": 0.5,
    "top_p": 0.95,
    "max_tokens": 1024,
    "frequency_penalty": 0,
    "presence_penalty": 0,
}
# The paper's released-model row (Table 5), for side-by-side printing.
PAPER_AZEROS = {
    "AlpacaEval": 4.44,
    "CommonEval": 4.18,
    "WildVoice": 3.91,
    "SD-QA": 60.22,
    "BBH": 56.30,
    "AdvBench": 98.65,
    "IFEval": 61.29,
    "OBQA": 72.09,
    "MMSU": 59.01,
    "Overall": 73.13,
    "Gender": 86.75,
    "Emotion": 71.45,
    "Age": 61.30,
    "LID": 84.80,
    "Entity": 73.60,
    "Intent": 85.60,
    "Avg": 77.25,
    "Chat": 8.28,
}
COLUMNS = ([c for c, _ in bench_scoring.VB_COLUMNS] + ["Overall", *bench_scoring.AIR_COLUMNS]
           + ["Avg", "Chat"])


# --------------------------------------------------------------------------------------------------
# 1. Answering


@dataclass
class RunOptions:
    model: str
    out: Path
    batch_size: int = 8
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    limit: int | None = None  # first N items per config/split (a quick look)


def check_run_file(folder: Path, settings: dict) -> None:
    """RUN/<bench>/run.json pins the settings of the answers in that folder: resuming with another
    model or another max_new_tokens would mix two runs in one number."""
    path = folder / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        for key in ("model", "max_new_tokens", "prompt_extra"):
            if old.get(key) != settings.get(key):
                raise ValueError(
                    f"{path}: answers were made with {key}={old.get(key)!r}, not "
                    f"{settings.get(key)!r}; use another --out"
                )


def write_run_file(folder: Path, settings: dict, total: int, missing: dict) -> dict:
    """Counts for the record: items in the files, answered, skipped (answered + skipped = items
    unless --limit cut the run short). `missing`: id -> why, for items the model never saw."""
    done = eval_support.load_done(folder / "answers.jsonl", settings["model"])
    answered = sum(1 for row in done.values() if row.get("response") is not None)
    skipped = dict(missing)
    skipped.update(
        {row["id"]: row["skipped"] for row in done.values() if row.get("response") is None}
    )
    info = {
        **settings,
        "greedy": True,
        "items": total,
        "answered": answered,
        "skipped": len(skipped),
        "skipped_items": skipped,
    }
    files.write_atomic(folder / "run.json", [json.dumps(info, indent=1, ensure_ascii=False) + "\n"])
    return info


def make_answerer(model, bench: bench_data.Benchmark, max_new_tokens: int):
    """answer(chunk, system) for eval_support.run_items: greedy answers; an unreadable clip
    becomes a row with response None and the reason, so it is counted once and never retried."""
    from llm import GenerationOptions

    options = GenerationOptions(max_new_tokens=max_new_tokens)

    def answer(chunk, system):
        results, ready, waves = {}, [], []
        for it in chunk:
            try:
                waves.append(bench.waveform(it.id))
                ready.append(it)
            except data.AudioError as e:
                results[it.id] = {"response": None, "skipped": f"unreadable audio: {e}"}
        if ready:
            messages = [[model.user_message(it.question)] for it in ready]
            for it, text in zip(
                ready, model.generate(waves, messages, options)
            ):
                results[it.id] = {"response": text, "max_new_tokens": max_new_tokens}
        return [results[it.id] for it in chunk]

    return answer


def answer_benchmark(model, name: str, benches: dict, opts: RunOptions, prompt_extra=None) -> dict:
    """Answer every item of `benches` into RUN/<name>/answers.jsonl. benches: {label: Benchmark, or
    a function that reads it}; a function is called when its turn comes, so only one VoiceBench
    config's audio is in memory at a time."""
    folder = opts.out / name
    folder.mkdir(parents=True, exist_ok=True)
    model_name = str(Path(opts.model).resolve()) if Path(opts.model).exists() else str(opts.model)
    settings = {
        "benchmark": name,
        "model": model_name,
        "max_new_tokens": opts.max_new_tokens,
        "prompt_extra": prompt_extra,
        "limit": opts.limit,
    }
    check_run_file(folder, settings)
    total, missing = 0, {}
    for label, bench in benches.items():
        bench = bench() if callable(bench) else bench
        total += bench.total
        missing.update(bench.skipped)
        items = bench.items[: opts.limit] if opts.limit else bench.items
        print(
            f"{name} {label}: {len(items)} items ({len(bench.skipped)} skipped: audio missing)",
            file=sys.stderr,
        )
        eval_support.run_items(
            items,
            folder / "answers.jsonl",
            settings["model"],
            ("audio",),
            opts.batch_size,
            make_answerer(model, bench, opts.max_new_tokens),
        )
    return write_run_file(folder, settings, total, missing)


def load_model(args):
    import torch

    from model import AZeroS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return AZeroS.from_pretrained(args.model, device=device, dtype=dtype).eval()


def voicebench_sets(data_dir, subsets) -> dict:
    """{"config/split": reader}. Each file is read when its turn comes (the audio of all of
    VoiceBench is several GB), but every one must exist before the GPU starts: a missing file should
    not stop the run an hour in."""
    for c in subsets:
        if c not in bench_scoring.VOICEBENCH:
            raise ValueError(f"unknown VoiceBench config {c!r}; "
                             f"one of {sorted(bench_scoring.VOICEBENCH)}")
        for s in bench_scoring.VOICEBENCH[c]:
            bench_data.parquet_files(Path(data_dir), c, s)
    return {
        f"{c}/{s}": functools.partial(bench_data.read_voicebench, data_dir, c, s)
        for c in subsets
        for s in bench_scoring.VOICEBENCH[c]
    }


# --------------------------------------------------------------------------------------------------
# 2. The judge: an OpenAI-compatible /chat/completions endpoint, standard library only


@dataclass
class JudgeOptions:
    url: str
    model: str
    api_key: str = "EMPTY"
    workers: int = 4
    retries: int = 3
    retry_sleep: float = 5.0
    timeout: float = 600.0
    chat_temperature: float | None = (
        None  # None: the official 1.0, with a seeded half of the items at 2.0
    )
    seed: int = 0


def judge_call(opts: JudgeOptions, messages: list[dict], n: int = 1, **params) -> list[str]:
    """The judge's n outputs for one prompt. Servers that ignore `n` are asked again for the
    rest."""
    outputs = []
    while len(outputs) < n:
        body = {"model": opts.model, "messages": messages, "n": n - len(outputs), **params}
        request = urllib.request.Request(
            opts.url.rstrip("/") + "/chat/completions",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {opts.api_key}"},
        )
        for attempt in range(opts.retries):
            try:
                with urllib.request.urlopen(request, timeout=opts.timeout) as response:
                    reply = json.loads(response.read())
                break
            except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
                if attempt == opts.retries - 1:
                    raise RuntimeError(f"judge {opts.url}: {type(e).__name__}: {e}") from None
                time.sleep(opts.retry_sleep)
        outputs += reply_texts(reply, opts.url)
    return outputs[:n]


def reply_texts(reply, url: str) -> list[str]:
    """The texts of a chat completion. Anything else (a list, `content: null`, a null message,
    plain-string choices) fails the job, which the next run asks again: it is never kept as an
    answer (a cached null made every later scoring crash)."""
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices:
        raise RuntimeError(f"judge {url}: a reply without a list of choices "
                           f"({json.dumps(reply)[:80]})")
    texts = []
    for c in choices:
        message = c.get("message") if isinstance(c, dict) else None
        texts.append(message.get("content") if isinstance(message, dict) else None)
    if not all(isinstance(t, str) for t in texts):
        raise RuntimeError(f"judge {url}: a choice without a text message.content "
                           f"({json.dumps(choices)[:80]})")
    return texts


def judge_jobs_voicebench(rows: list[dict]) -> list[dict]:
    """One job per answered item of the judged configs: the official prompt, 3 samples at T=0.5."""
    jobs = []
    for r in rows:
        if r["config"] in bench_scoring.JUDGED_OPEN:
            prompt = bench_scoring.fill(bench_scoring.OPEN_PROMPT, prompt=r["prompt"],
                                        response=r["response"])
        elif r["config"] == "sd-qa":
            prompt = bench_scoring.fill(
                bench_scoring.QA_PROMPT, prompt=r["prompt"], reference=r["reference"],
                response=r["response"]
            )
        else:
            continue
        jobs.append(
            {
                "key": r["id"],
                "messages": [
                    {"role": "system", "content": bench_scoring.JUDGE_SYSTEM},
                    {"role": "user", "content": prompt},
                ],
                "params": dict(VOICEBENCH_JUDGE),
            }
        )
    return jobs


def judge_jobs_chat(rows: list[dict], opts: JudgeOptions) -> list[dict]:
    """Two jobs per answered Chat item: the reference as Assistant 1 (official order) and
    swapped."""
    jobs = []
    for r in rows:
        for order, (first, second) in (
            ("ref_first", (r["answer_gt"], r["response"])),
            ("model_first", (r["response"], r["answer_gt"])),
        ):
            prompt = bench_scoring.fill(
                bench_scoring.CHAT_PROMPT,
                meta=str(r["meta_info"]),
                question=r["question"],
                first=first,
                second=second,
            )
            temperature = opts.chat_temperature
            if (
                temperature is None
            ):  # official: 1.0, and 2.0 for a random half (seeded per item and order)
                temperature = (
                    2.0 if random.Random(f"{opts.seed}:{r['id']}:{order}").random() < 0.5 else 1.0
                )
            jobs.append(
                {
                    "key": f"{r['id']}#{order}",
                    "messages": [{"role": "user", "content": prompt}],
                    "params": {"n": 1, "temperature": temperature, "max_tokens": 1024},
                }
            )
    return jobs


def run_judge(jobs: list[dict], path: Path, opts: JudgeOptions) -> tuple[dict, int]:
    """Ask the judge every job not yet in `path` (jsonl, one line per job, raw outputs kept); lines
    are appended as answers arrive, so a killed run loses at most the jobs in flight. -> (key ->
    row, number of jobs that still failed after the retries: they are retried by the next run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    params = {j["key"]: j["params"] for j in jobs}
    done = {row["key"]: row for _, row in files.read_jsonl(path, repair=True)
            if reusable(row, opts, params)}
    todo = [j for j in jobs if j["key"] not in done]
    errors = 0
    with ThreadPoolExecutor(max_workers=opts.workers) as pool:
        futures = {pool.submit(judge_call, opts, j["messages"], **j["params"]): j for j in todo}
        for future in as_completed(futures):
            job = futures[future]
            try:
                outputs = future.result()
            except RuntimeError as e:
                errors += 1
                print(f"judge failed on {job['key']}: {e}", file=sys.stderr)
                continue
            row = {
                "key": job["key"],
                "judge": opts.model,
                "params": job["params"],
                "outputs": outputs,
            }
            files.append_jsonl(path, [row])
            done[job["key"]] = row
    return done, errors


def reusable(row: dict, opts: JudgeOptions, params: dict) -> bool:
    """A kept judge output counts for this run when the same judge wrote it with the same request
    parameters (judge name and parameters are part of the key: another --judge-model or
    --chat-temperature asks afresh) and every output is a text (older files could hold a null)."""
    outputs = row.get("outputs")
    return (row.get("judge") == opts.model and row.get("params") == params.get(row.get("key"))
            and isinstance(outputs, list) and all(isinstance(o, str) for o in outputs))


# --------------------------------------------------------------------------------------------------
# 3. Scoring


def answered_rows(folder: Path) -> list[dict]:
    run = json.loads((folder / "run.json").read_text())
    done = eval_support.load_done(folder / "answers.jsonl", run["model"])
    return [row for row in done.values() if row.get("response") is not None]


def score_open(rows: list[dict], judged: dict) -> dict:
    """A 1-5 column: mean over every parsed judge sample (3 per item); failures counted."""
    scores, fails = [], 0
    for r in rows:
        for text in judged.get(r["id"], {}).get("outputs", []):
            value = bench_scoring.parse_open_score(text.strip())
            fails += value is None
            scores += [] if value is None else [value]
    return {
        "n": len(rows),
        "score": sum(scores) / len(scores) if scores else None,
        "samples": len(scores),
        "parse_failures": fails,
        "not_judged": sum(r["id"] not in judged for r in rows),
    }


def score_sdqa(rows: list[dict], judged: dict | None, panda: bool, seed: int, dev: list) -> dict:
    """SD-QA's two halves: `gpt` (judge majority vote) and `panda` (offline classifier, opt-in)."""
    sd = {"n": len(rows)}
    if judged is not None:
        rng, votes, ties = random.Random(seed), [], 0
        for r in rows:
            if r["id"] in judged:
                outputs = [o.strip() for o in judged[r["id"]]["outputs"]]
                ok, tie = bench_scoring.sdqa_vote(outputs, rng)
                votes.append(ok)
                ties += tie
        sd.update(
            {
                "gpt": 100 * sum(votes) / len(votes) if votes else None,
                "ties": ties,
                "not_judged": len(rows) - len(votes),
            }
        )
    if not panda:
        dev.append("SD-QA PANDA half not run (opt-in: --panda with qa-metrics==0.2.17)")
        return sd
    try:
        sd["panda"] = bench_scoring.score_panda(rows)["panda"]
    except RuntimeError as e:
        dev.append(f"SD-QA PANDA half not run: {e}")
    return sd


def score_voicebench(
    rows, judged: dict | None, panda: bool, sdqa_gpt_only: bool, seed: int, dev: list
) -> dict:
    """Per config details, the paper's columns and Overall. Columns that need a judge stay None
    without one (or while some of their items are not judged yet)."""
    by_config = {}
    for r in rows:
        by_config.setdefault(r["config"], []).append(r)
    details, cols = {}, {}
    if "mmsu" in by_config:
        mmsu = by_config["mmsu"]
        splits = [s for s in bench_scoring.MMSU_SPLITS if any(r["split"] == s for r in mmsu)]
        details["mmsu"] = {
            "pooled": bench_scoring.score_mcq(mmsu, seed),
            "splits": {s: bench_scoring.score_mcq([r for r in mmsu if r["split"] == s], seed)
                       for s in splits},
        }
        cols["MMSU"] = details["mmsu"]["pooled"]["acc"]
    rules = (
        ("OBQA", "openbookqa", lambda rs: bench_scoring.score_mcq(rs, seed), "acc"),
        ("BBH", "bbh", lambda rs: bench_scoring.score_bbh(rs, seed), "acc"),
        ("AdvBench", "advbench", bench_scoring.score_advbench, "refusal_rate"),
        ("IFEval", "ifeval", bench_scoring.score_ifeval, "score"),
    )
    for name, config, score, key in rules:
        if config in by_config:
            try:
                details[config] = score(by_config[config])
                cols[name] = details[config][key]
            except RuntimeError as e:  # IFEval's packages or NLTK data missing: score the rest
                dev.append(f"{name} not scored: {e}")
    for name, config in bench_scoring.VB_COLUMNS:
        if config in bench_scoring.JUDGED_OPEN and config in by_config and judged is not None:
            details[config] = score_open(by_config[config], judged)
            cols[name] = None if details[config]["not_judged"] else details[config]["score"]
    if "sd-qa" in by_config:
        sd = details["sd-qa"] = score_sdqa(by_config["sd-qa"], judged, panda, seed, dev)
        complete = sd.get("gpt") is not None and not sd["not_judged"]
        if complete and sd.get("panda") is not None:
            cols["SD-QA"] = (sd["panda"] + sd["gpt"]) / 2
        elif complete and sdqa_gpt_only:
            cols["SD-QA"] = sd["gpt"]
            dev.append("SD-QA column = GPT half only (official: mean of PANDA and GPT halves)")
    for key in ("mmsu", "openbookqa", "bbh"):
        fail = (details.get(key, {}).get("pooled") or details.get(key, {})).get("fail")
        if fail:
            dev.append(
                f"{key}: {fail:.2f}% of answers unreadable, given a seeded random guess "
                f"(seed {seed}; the official scorer guesses unseeded)"
            )
    return {"columns": cols, "overall": bench_scoring.voicebench_overall(cols), "details": details}


def score_chat(rows: list[dict], judged: dict | None) -> dict:
    """Per order: mean of the model's 1-10 scores over parsed judge lines (failures out,
    counted)."""
    if judged is None:
        return {"n": len(rows), "score": None}
    out = {"n": len(rows)}
    for order, model_pos in (("ref_first", 1), ("model_first", 0)):
        scores, fails, missing = [], 0, 0
        for r in rows:
            row = judged.get(f"{r['id']}#{order}")
            if row is None:
                missing += 1
                continue
            pair = bench_scoring.parse_chat_pair(row["outputs"][0])
            fails += pair is None
            scores += [] if pair is None else [pair[model_pos]]
        out[order] = {
            "score": sum(scores) / len(scores) if scores else None,
            "parsed": len(scores),
            "parse_failures": fails,
            "not_judged": missing,
        }
    both = [out[o]["score"] for o in ("ref_first", "model_first")]
    complete = all(out[o]["not_judged"] == 0 for o in ("ref_first", "model_first"))
    out["score"] = sum(both) / 2 if None not in both and complete else None
    return out


def score_run(
    out: Path,
    judge: JudgeOptions | None,
    panda: bool = False,
    sdqa_gpt_only: bool = False,
    seed: int = 0,
) -> dict:
    """Everything RUN holds -> summary dict (also written as summary.json / summary.md)."""
    summary, dev, settings = {"columns": {}}, [], {}
    vb, air, chat = out / "voicebench", out / "air_foundation", out / "air_chat"
    if not any((folder / "run.json").exists() for folder in (vb, air, chat)):
        what = "no such folder" if not out.is_dir() else "no answers in it"
        raise ValueError(f"--out {out}: {what} (expected voicebench/, air_foundation/ or "
                         "air_chat/ with a run.json); answer a benchmark into it first")
    for folder in (vb, air, chat):
        if (folder / "run.json").exists():
            run = json.loads((folder / "run.json").read_text())
            settings[folder.name] = {
                k: run[k] for k in ("model", "max_new_tokens", "items", "answered", "skipped")
            }
            if run["skipped"]:
                dev.append(
                    f"{folder.name}: {run['skipped']} of {run['items']} items skipped "
                    "(see run.json)"
                )
            if run.get("limit"):
                dev.append(
                    f"{folder.name}: only the first {run['limit']} items of each set (--limit)"
                )
    if (vb / "run.json").exists():
        dev.append(
            "VoiceBench audio resampled to 16 kHz with data.resample (torchaudio's filter; the "
            "official loader uses the datasets library's)"
        )
        rows = answered_rows(vb)
        judged = None
        if judge is not None:
            judged, errors = run_judge(
                judge_jobs_voicebench(rows), out / "judge" / "voicebench.jsonl", judge
            )
            dev.append(
                f"VoiceBench judge: {judge.model} (official {OFFICIAL_JUDGES['voicebench']}, "
                f"paper {PAPER_JUDGES['voicebench']})"
                + (f"; {errors} jobs failed" if errors else "")
            )
        else:
            dev.append(
                "no judge given: AlpacaEval, CommonEval, WildVoice, SD-QA (GPT half) "
                "and Overall missing"
            )
        summary["voicebench"] = score_voicebench(rows, judged, panda, sdqa_gpt_only, seed, dev)
        for name in ("alpacaeval_full", "commoneval", "wildvoice"):
            fails = summary["voicebench"]["details"].get(name, {}).get("parse_failures")
            if fails:
                dev.append(
                    f"{name}: {fails} judge outputs unparseable, left out "
                    "(the official scorer stops)"
                )
        summary["columns"].update(summary["voicebench"]["columns"])
        summary["columns"]["Overall"] = summary["voicebench"]["overall"]
    if (air / "run.json").exists():
        per_dir = bench_scoring.score_air_foundation(answered_rows(air))
        cols = bench_scoring.air_columns(per_dir)
        summary["air_foundation"] = {"dirs": per_dir, "columns": cols}
        summary["columns"].update({c: v["macro"] for c, v in cols.items()})
        summary["columns"]["Avg"] = bench_scoring.air_avg({c: v["macro"] for c, v in cols.items()})
        extra = json.loads((air / "run.json").read_text()).get("prompt_extra")
        dev.append(
            f"AIR Foundation: extra line {extra!r} after the options "
            "(position not stated in the paper); "
            "Gender/Emotion = macro mean of their two folders (pooled in air_foundation.columns)"
        )
    if (chat / "run.json").exists():
        judged = None
        if judge is not None:
            judged, errors = run_judge(
                judge_jobs_chat(answered_rows(chat), judge), out / "judge" / "air_chat.jsonl", judge
            )
            temp = (
                "official 1.0 with a seeded half at 2.0"
                if judge.chat_temperature is None
                else f"fixed {judge.chat_temperature} (official: 1.0 with half at 2.0)"
            )
            dev.append(
                f"AIR Chat judge: {judge.model} (official {OFFICIAL_JUDGES['air_chat']}, paper "
                f"{PAPER_JUDGES['air_chat']}), temperature {temp}; Chat = mean of both orders"
                + (f"; {errors} jobs failed" if errors else "")
            )
        summary["air_chat"] = score_chat(answered_rows(chat), judged)
        summary["columns"]["Chat"] = summary["air_chat"]["score"]
    for folder, info in settings.items():
        dev.append(
            f"{folder}: greedy, max_new_tokens {info['max_new_tokens']} (not reported by the paper)"
        )
    missing = [c for c in COLUMNS if summary["columns"].get(c) is None]
    if missing:
        dev.append(f"missing columns: {', '.join(missing)}")
    summary.update({"settings": settings, "seed": seed, "deviations": dev})
    summary = eval_support.no_nan(summary)
    files.write_atomic(
        out / "summary.json", [json.dumps(summary, indent=1, ensure_ascii=False) + "\n"]
    )
    files.write_atomic(out / "summary.md", [summary_markdown({str(out): summary})])
    return summary


def summary_markdown(runs: dict) -> str:
    """Paper-order table (one row per run, then the paper's AZeroS row), the per-split / per-folder
    details of each run, and its deviations."""
    head = "| run | " + " | ".join(COLUMNS) + " |\n|---|" + "---:|" * len(COLUMNS) + "\n"
    rows = "".join(
        f"| {name} | "
        + " | ".join(bench_scoring.fmt(s["columns"].get(c)) for c in COLUMNS) + " |\n"
        for name, s in runs.items()
    )
    rows += (
        "| paper (AZeroS, Table 5) | "
        + " | ".join(bench_scoring.fmt(PAPER_AZEROS[c]) for c in COLUMNS)
        + " |\n"
    )
    text = head + rows
    for name, s in runs.items():
        text += f"\n### {name}\n"
        mmsu = s.get("voicebench", {}).get("details", {}).get("mmsu")
        if mmsu:
            text += (
                "\nMMSU per split: "
                + ", ".join(f"{k} {bench_scoring.fmt(v['acc'])}" for k, v in mmsu["splits"].items())
                + "\n"
            )
        dirs = s.get("air_foundation", {}).get("dirs")
        if dirs:
            text += "\n| AIR folder | parsed | correct | acc % | failures |\n"
            text += "|---|---:|---:|---:|---:|\n"
            text += "".join(
                f"| {d} | {v['parsed']} | {v['correct']} | {bench_scoring.fmt(v['acc'])} "
                f"| {v['fail']} |\n"
                for d, v in sorted(dirs.items())
            )
        text += "\nDeviations:\n" + "".join(f"- {d}\n" for d in s["deviations"])
    return text


# --------------------------------------------------------------------------------------------------
# 4. Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("voicebench", "airbench-foundation", "airbench-chat"):
        q = sub.add_parser(name)
        q.add_argument(
            "--model", required=True, help="model folder in the release layout (model.py)"
        )
        q.add_argument(
            "--data", required=True, help="the downloaded dataset folder (README 'Benchmarks')"
        )
        q.add_argument("--out", required=True, help="run folder; rerun the same command to resume")
        q.add_argument("--batch-size", type=int, default=8)
        q.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
        q.add_argument(
            "--limit", type=int, default=None, help="first N items per config/split (quick look)"
        )
        q.add_argument("--device", default=None)
        q.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
        if name == "voicebench":
            q.add_argument(
                "--subsets", default=",".join(bench_scoring.VOICEBENCH),
                help="comma list of configs",
            )
        if name == "airbench-foundation":
            q.add_argument(
                "--no-extra-prompt",
                action="store_true",
                help=f"leave out AZeroS's line {eval_support.OPTION_PROMPT!r}",
            )
    q = sub.add_parser("score")
    q.add_argument("--out", required=True, help="the run folder")
    q.add_argument(
        "--judge-url",
        default=None,
        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1",
    )
    q.add_argument("--judge-model", default=None, help="model name the judge server serves")
    q.add_argument(
        "--judge-key",
        default=os.environ.get("OPENAI_API_KEY", "EMPTY"),
        help="API key (default: $OPENAI_API_KEY, else a dummy for local servers)",
    )
    q.add_argument("--judge-workers", type=int, default=4)
    q.add_argument(
        "--chat-temperature",
        type=float,
        default=None,
        help="fixed AIR Chat judge temperature (default: official 1.0 / 2.0 halves)",
    )
    q.add_argument(
        "--panda", action="store_true", help="run SD-QA's PANDA half (qa-metrics==0.2.17)"
    )
    q.add_argument(
        "--sdqa-gpt-only", action="store_true", help="SD-QA column from the judge half alone"
    )
    q.add_argument("--seed", type=int, default=0, help="seed of the random fallbacks")
    q = sub.add_parser("summary")
    q.add_argument("runs", nargs="+", help="run folders already scored")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Answer one benchmark (voicebench, airbench-*), score a run, or summarise scored runs;
    returns the answering info, the score summary, or the summaries."""
    args = parse_args(argv)
    if args.command == "score":
        judge = None
        if args.judge_url:
            if not args.judge_model:
                raise checks.CheckError("--judge-url needs --judge-model")
            judge = JudgeOptions(
                args.judge_url,
                args.judge_model,
                args.judge_key,
                args.judge_workers,
                chat_temperature=args.chat_temperature,
                seed=args.seed,
            )
        summary = score_run(Path(args.out), judge, args.panda, args.sdqa_gpt_only, args.seed)
        print(summary_markdown({args.out: summary}), end="")
        return summary
    if args.command == "summary":
        runs = {r: json.loads((Path(r) / "summary.json").read_text()) for r in args.runs}
        print(summary_markdown(runs), end="")
        return runs
    if args.command == "voicebench":
        benches = voicebench_sets(args.data, [s for s in args.subsets.split(",") if s])
        name, extra = "voicebench", None
    elif args.command == "airbench-foundation":
        extra = None if args.no_extra_prompt else eval_support.OPTION_PROMPT
        benches, name = (
            {"foundation": bench_data.read_air_foundation(args.data, extra=extra)},
            "air_foundation",
        )
    else:
        benches, name, extra = {"chat": bench_data.read_air_chat(args.data)}, "air_chat", None
    opts = RunOptions(args.model, Path(args.out), args.batch_size, args.max_new_tokens, args.limit)
    info = answer_benchmark(load_model(args), name, benches, opts, extra)
    print(
        f"{name}: {info['answered']} answered, {info['skipped']} skipped "
        f"of {info['items']} items -> "
        f"{Path(args.out) / name / 'answers.jsonl'}"
    )
    return info


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
