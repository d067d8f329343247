"""Whisper encoder speed: ours (no padding to 30 s) against transformers' (padded to 30 s).

Paper Table 6 trains AZeroS with a Whisper encoder. transformers' WhisperEncoder only accepts 30-s
inputs (3000 log-mel frames), so a 3-s clip is padded with 27 s of silence; the official code and
whisper_encoder.py cut the positional embeddings to the input instead. Each row times one clip (or
one batch), front end included, random weights of the named Whisper size:

    reference: WhisperFeatureExtractor (pad to 30 s) + WhisperEncoder.forward, cut to the clip
    ours:      whisper_encoder.log_mel (no padding) + WhisperSpeechEncoder.forward

Times are CPU seconds of this process (time.process_time) on --threads threads (default 1), best of
--repeats: on a machine shared with other jobs, wall time mostly measures the other jobs. On a GPU,
wall time after synchronising. "ratio" is reference time / our time (above 1: ours is faster).
"frames differ by" is the largest difference between the two outputs over the clip's frames: 0 up to
float32 rounding for a 30-s clip (the same computation); for shorter clips it is how much the 27 s
of padding change the frames (the padded encoder attends to the silence): the two are not
interchangeable.

    python -m bench.bench_whisper                      # tiny and base, CPU, best of 3
    python -m bench.bench_whisper --sizes small --repeats 5 --device cuda
"""
import argparse
import platform
import sys
import time
from datetime import date
from functools import partial

import torch

import whisper_encoder as W
from support import checks

SIZES = {  # d_model, layers, heads (openai-whisper's model dimensions)
    "tiny": (384, 4, 6), "base": (512, 6, 8), "small": (768, 12, 12), "medium": (1024, 24, 16)}
CLIPS = {"3 s": [3.0], "10 s": [10.0], "30 s": [30.0],
         "batch 10/8.7/7.3/6 s": [10.0, 8.7, 7.3, 6.0]}


def build(size: str, device) -> W.WhisperSpeechEncoder:
    from transformers import WhisperConfig

    d, layers, heads = SIZES[size]
    config = WhisperConfig(d_model=d, encoder_layers=layers, encoder_attention_heads=heads,
                           encoder_ffn_dim=4 * d, decoder_layers=1)
    torch.manual_seed(0)
    return W.WhisperSpeechEncoder(config).to(device).eval()


def reference(enc, fe, clip, device) -> torch.Tensor:
    x = fe([w.numpy() for w in clip], sampling_rate=16000, return_tensors="pt").input_features
    return enc.encoder(x.to(device)).last_hidden_state


def ours(enc, fe, clip, device) -> torch.Tensor:
    return enc(*W.log_mel(clip, device=device))[0]


def best_time(fn, repeats: int, device) -> tuple[float, object]:
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return min(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import WhisperFeatureExtractor

    device = torch.device(args.device)
    fe = WhisperFeatureExtractor(feature_size=80)
    g = torch.Generator().manual_seed(0)
    waves = {name: [0.1 * torch.randn(int(s * 16000), generator=g) for s in secs]
             for name, secs in CLIPS.items()}

    print(f"{date.today()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}, "
          f"best of {args.repeats}")
    unit = "ms" if device.type == "cuda" else "CPU ms"
    print(f"| size | input | reference: pad to 30 s ({unit}) | ours: no padding ({unit}) | ratio "
          "| frames differ by |")
    print("|---|---|---:|---:|---:|---:|")
    for size in args.sizes:
        enc = build(size, device)
        for name, clip in waves.items():
            with torch.no_grad():
                t_ref, ref = best_time(partial(reference, enc, fe, clip, device), args.repeats,
                                       device)
                t_ours, out = best_time(partial(ours, enc, fe, clip, device), args.repeats, device)
            n = [len(w) // W.HOP_LENGTH for w in clip]
            diff = max(float((out[i, : (k + 1) // 2] - ref[i, : (k + 1) // 2]).abs().max())
                       for i, k in enumerate(n))
            print(f"| {size} | {name} | {1000 * t_ref:.1f} | {1000 * t_ours:.1f} "
                  f"| {t_ref / t_ours:.2f}x | {diff:.2e} |")


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
