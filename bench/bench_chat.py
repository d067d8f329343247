"""Benchmark: per-turn latency of the web demo's chat (app.Conversation), cache kept vs. re-feeding.

A three-turn conversation (a clip, another clip, a text question) as app.py runs it: each turn's
time to its first token and to the whole answer, the LLM positions fed and the clips encoded. For
comparison, what re-feeding the whole conversation (the official service) must do before its first
token: encode every clip so far again and feed every position to the LLM once.

    python -m bench.bench_chat --model exp/demo/stage2         # clips from exp/demo/corpus
    python -m bench.bench_chat --model M --clips a.wav b.wav --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import demo  # noqa: F401  (before torch: OMP_WAIT_POLICY=PASSIVE, see bench_generate.py)

# isort: split
import sys

import torch

import data
from app import Conversation
from llm import GenerationOptions
from model import AZeroS
from support import checks

QUESTIONS = ("What is said, and by whom?", "And in this one?", "Which of the two was faster?")


def turn(conv: Conversation, wave, text: str, options: GenerationOptions) -> dict:
    before = dict(conv.work)
    start, first = time.perf_counter(), None
    for _ in conv.ask(wave, text, options):
        first = first or time.perf_counter() - start
    whole = time.perf_counter() - start
    return {"first": first or whole, "whole": whole, "tokens": len(conv.answer),
            "positions": conv.work["positions"] - before["positions"],
            "clips": conv.work["clips"] - before["clips"]}


@torch.no_grad()
def refeed_first_token(conv: Conversation, waves: list) -> float:
    """Seconds the official way needs before the first token of the conversation's next answer:
    every clip encoded again, the whole prompt fed once (the answer itself is left out)."""
    model = conv.model
    start = time.perf_counter()
    frames = [s for w in waves for s in conv.encode(w)]
    prompt = conv.ids[:len(conv.ids) - len(conv.answer)]
    x = conv.embed(prompt, frames, skip=0)
    model.llm(inputs_embeds=x, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--clips", nargs=2, help="two audio files (default: the demo's held-out ones)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    clips = args.clips or [r.audio for r in data.read_manifest(
        Path(args.model).resolve().parent / "corpus" / "test_sentences.jsonl")[:2]]
    torch.manual_seed(0)
    model = AZeroS.from_pretrained(args.model, device="cpu")
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    waves = [data.load_audio(c) for c in clips]
    print(f"model {args.model}, {torch.get_num_threads()} threads, greedy, at most "
          f"{args.max_new_tokens} new tokens; clips {[f'{len(w) / 16000:.1f} s' for w in waves]}")
    print("| turn | first token (s) | whole answer (s) | tokens | prompt positions fed "
          "| clips encoded | re-feed: prompt positions | re-feed: first token (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    conv = Conversation(model)
    turns = [(waves[0], QUESTIONS[0]), (waves[1], QUESTIONS[1]), (None, QUESTIONS[2])]
    for k, (wave, text) in enumerate(turns, 1):
        r = turn(conv, wave, text, options)
        so_far = [w for w, _ in turns[:k] if w is not None]
        refeed = refeed_first_token(conv, so_far)
        conv.work["clips"] -= len(so_far)  # the comparison's own encoding is not the chat's
        prompt = len(conv.ids) - len(conv.answer)
        fed = r["positions"] - (len(conv.cache_ids) - prompt)  # less the answer's own tokens
        print(f"| {k} | {r['first']:.3f} | {r['whole']:.3f} | {r['tokens']} | {fed} "
              f"| {r['clips']} | {prompt} | {refeed:.3f} |", flush=True)


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
