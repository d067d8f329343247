"""Benchmark: target generation, length-sorted token-budget batches vs fixed input-order batches.

The official script (scripts/data_generation/run_data_generation.py) cuts the manifest into fixed
batches of `--batch-size` rows in input order and pads each to its longest prompt.
generate_targets.py sorts rows by prompt length and packs them under a token budget. Same rows, same
model, same greedy decoding; we time the transformers backend on CPU with SmolLM2-135M-Instruct (the
bundled GGUF) and compare generated tokens/s.

    python -m bench.bench_generate          # 64 rows, 32 new tokens, batches of 16, 3 rounds
    python -m bench.bench_generate --rows 64 --max-new-tokens 32 --batch-size 8

A third line (sorted, but fixed batch size) separates the two ingredients: less padding from
sorting, and batch sizes that follow the budget.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Imported before torch: demo sets OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of
# spinning, which on a shared machine burns CPU time that is not ours to measure).
import demo
import generate_targets as gt
from llm import load_llm
from support import checks

WORDS = ("the weather is great today and we should go out for a walk in the park before it starts "
         "to rain i think the meeting was moved to thursday because nobody could make it on monday "
         "morning what shall we do if they suddenly walk in on us please tell me the way to the "
         "station").split()


def make_manifest(path: Path, n: int, seed: int) -> Path:
    """n utterances with transcripts of 2 to 60 words (a realistic 1-30 s spread), in random
    length order."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = rng.randint(2, 60)
            text = " ".join(rng.choice(WORDS) for _ in range(words)) + "."
            row = {"id": f"b{i:04d}", "audio": f"{i}.wav", "duration": max(1.0, words / 2.5),
                   "text": text, "language": "en",
                   "meta": {"gender": rng.choice(["male", "female"])}}
            f.write(json.dumps(row) + "\n")
    return path


def fixed_batches(n: int, size: int, order=None) -> list[list[int]]:
    order = list(range(n)) if order is None else order
    return [order[i:i + size] for i in range(0, n, size)]


def time_batches(backend, prompts, batches) -> dict:
    """Run the batches -> wall and CPU seconds, generated tokens, and two noise-free cost counts:
    prompt slots (rows x padded prompt width, the prefill work) and row-steps (rows x decode steps
    the batch ran, the decode work: a batch decodes until its longest answer ends)."""
    lengths = [len(backend.prompt_ids(p)) for p in prompts]
    responses = [None] * len(prompts)
    tokens = pad_slots = prompt_slots = row_steps = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        gens = backend.generate([prompts[i] for i in batch])
        width = max(lengths[i] for i in batch)
        pad_slots += sum(width - lengths[i] for i in batch)
        prompt_slots += len(batch) * width
        row_steps += len(batch) * max(g.n_tokens for g in gens)
        for i, g in zip(batch, gens):
            responses[i] = g.response
            tokens += g.n_tokens
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"seconds": wall, "cpu": cpu, "tokens": tokens, "batches": len(batches),
            "rows_per_batch": statistics.mean(len(b) for b in batches), "pad_slots": pad_slots,
            "prompt_slots": prompt_slots, "row_steps": row_steps, "responses": responses}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model",
                   help="HF id/folder or .gguf (default: the bundled SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--mode", default="sift_sp", choices=gt.MODES[1:])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16, help="the official fixed batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved repetitions; the best CPU time counts")
    args = p.parse_args(argv)

    model_path = args.model or demo.smollm2_path()
    import torch

    model, tok = load_llm(model_path, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_manifest(Path(tmp) / "bench.jsonl", args.rows, args.seed)
        prompts = [r.prompt for r in gt.plan([manifest], args.mode)[0] if r.skip is None]

    # Same memory bound: the official run must provision for a batch of batch_size rows padded to
    # the longest prompt; our budget is that many tokens, which fits more rows of short prompts.
    probe = gt.HFBackend(model, tok, model_label="bench", max_new_tokens=args.max_new_tokens)
    lengths = [len(probe.prompt_ids(p)) for p in prompts]
    budget = args.batch_size * (max(lengths) + args.max_new_tokens)
    ours = gt.HFBackend(model, tok, model_label="bench", max_new_tokens=args.max_new_tokens,
                        batch_tokens=budget)
    ours._ids = probe._ids
    by_length = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))

    ours.generate(prompts[:2])  # warm-up (first-call allocations), not timed
    n, size = len(prompts), args.batch_size
    runs = {
        f"official: fixed {size} rows, input order": fixed_batches(n, size),
        f"sorted, fixed {size} rows": fixed_batches(n, size, by_length),
        f"ours: sorted, budget {budget} tokens": ours.batches(prompts),
    }
    # Interleaved rounds, best CPU time per configuration: on a shared 2-core machine wall time
    # measures the neighbours; CPU time of this process much less so, and interleaving spreads
    # bursts over all configs.
    results = {}
    for _ in range(args.rounds):
        for name, batches in runs.items():
            r = time_batches(ours, prompts, batches)
            if name not in results or r["cpu"] < results[name]["cpu"]:
                results[name] = r

    base = next(iter(results.values()))
    print(f"\n{len(prompts)} rows ({args.mode}), prompts {min(lengths)}-{max(lengths)} tokens "
          f"(mean {statistics.mean(lengths):.0f}), max_new_tokens {args.max_new_tokens}, greedy, "
          f"CPU x{torch.get_num_threads()} threads, {Path(model_path).name}, "
          f"best of {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}\n")
    print("| batching | batches | rows/batch | padding (of prompt slots) | decode row-steps "
          "| new tokens | wall s | CPU s | tokens/s (wall) | tokens/CPU-s | vs official (CPU) "
          "| same responses |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        same = sum(a == b for a, b in zip(r["responses"], base["responses"]))
        print(f"| {name} | {r['batches']} | {r['rows_per_batch']:.1f} "
              f"| {r['pad_slots']} ({r['prompt_slots']}) | "
              f"{r['row_steps']} | {r['tokens']} | {r['seconds']:.1f} | {r['cpu']:.1f} | "
              f"{r['tokens'] / r['seconds']:.1f} | {r['tokens'] / r['cpu']:.1f} | "
              f"{base['cpu'] / r['cpu']:.2f}x | {same}/{len(prompts)} |")


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
