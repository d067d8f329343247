"""Talk to an AZeroS model from the command line (AZeroS paper, Sec. 4.1: the model in use).

    python infer.py audio.wav "Describe the audio."                # streams the answer
    python infer.py a.wav b.wav "What is the speaker's emotion?"    # one batch, a line per file
    python infer.py "What is the capital of France?"                # no audio: the LLM answers
    python infer.py audio.wav "..." --model path/to/model_dir       # default: AudenAI/azeros

Data flow: file -> 16 kHz wave -> AZeroS.generate (front end, frozen encoders, projectors, splice
into "{audio placeholder} {prompt}", frozen LLM) -> text. Greedy unless --temperature is given (then
top-p sampling); --system adds a system message (else the tokenizer's chat template decides).
Support (not the method): support/checks.py checks files and options first; a bad input is one line.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

os.environ.setdefault("MKL_DYNAMIC", "FALSE")  # before torch loads MKL (train.py says why)

from support import checks

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".sph")
DTYPES = ("auto", "float32", "float16", "bfloat16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Ask an AZeroS speech LLM about audio files.")
    p.add_argument("inputs", nargs="+", metavar="AUDIO... PROMPT",
                   help="zero or more audio files, then the prompt (may be left out after audio)")
    p.add_argument("--model", default="AudenAI/azeros", help="model folder or hub id (%(default)s)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=200, help="answer length (official: 200)")
    p.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (with --temperature)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when it works; a "
                   "large model on a CPU needs --device cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="LLM dtype; auto = the checkpoint's on GPU, float32 on CPU")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="autocast of front end, encoders and projectors, as in training (auto: "
                        "bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--max-audio-seconds", type=float, default=checks.MAX_AUDIO_SECONDS,
                   help=checks.MAX_AUDIO_HELP)
    args = p.parse_args(argv)
    args.audio, args.prompt = split_inputs(args.inputs)
    return args


def split_inputs(inputs: list[str]) -> tuple[list[str], str]:
    """All positionals but the last are audio; the last is the prompt, unless it looks like an
    audio file (an audio extension, no spaces): then it is audio, and a mistyped path is an error,
    not a question."""
    last = inputs[-1]
    looks_like_path = os.path.exists(last) or not any(c.isspace() for c in last)
    if last.lower().endswith(AUDIO_EXTENSIONS) and looks_like_path:
        return inputs, ""
    return inputs[:-1], last


def main(argv=None) -> list[str]:
    """Answer the prompt about each audio file; print and return the answers."""
    args = parse_args(argv)
    checks.infer_args(args)  # files, audio and options, before the slow imports and the model
    from support import model_support

    model_support.quiet_libraries()  # stdout is for the answer, from the first import on
    import torch

    import data
    from llm import GenerationOptions
    from model import AZeroS

    waves = [data.load_audio(path) for path in args.audio]
    device = checks.pick_device(args.device)  # never a silent CPU run of a 7B model
    checks.cpu_fallback(model_support.release_llm_parameters(args.model), args.device, device,
                        f"--model {args.model}")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AZeroS.from_pretrained(args.model, device=device, dtype=dtype,
                                   precision=args.precision)

    options = GenerationOptions(args.max_new_tokens, args.temperature, args.top_p)
    if not waves:  # a plain text question goes straight to the frozen LLM
        question = [[{"role": "user", "content": args.prompt}]]
        return model.generate(None, question, replace(options, stream=True), system=args.system)
    messages = [[model.user_message(args.prompt)] for _ in waves]
    if len(waves) == 1:
        return model.generate(waves, messages, replace(options, stream=True), system=args.system)
    answers = model.generate(waves, messages, options, system=args.system)
    for path, text in zip(args.audio, answers):
        print(f"{path}\t{text.strip()}", flush=True)
    return answers


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
