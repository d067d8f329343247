"""Peak memory of encoding one long utterance (fbank + frozen Zipformer, CPU, fp32, no_grad).

Why: the encoders attend over the whole utterance, so their memory grows with the square of its
length. This is the measurement behind the audio length limit (`--max-audio-seconds`, default 50 s)
of train.py, infer.py and evaluate.py.

Each length runs in a fresh subprocess so that its peak is its own. We report the process's peak
RSS minus its RSS just before the forward (weights, libraries and the waveform excluded): the memory
that encoding this much audio costs.

    python -m bench.bench_audio_memory                       # small encoder, 10/30/60/120 s
    python -m bench.bench_audio_memory --config tta_m10 --seconds 10 30   # the released size
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import data
from support import checks
from zipformer import ZipformerConfig, ZipformerEncoder

ROOT = Path(__file__).resolve().parent.parent

SMALL_CONFIG = ROOT / "tests" / "fixtures" / "zipformer_small" / "config.json"


def rss_mib() -> float:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_case(config: str, seconds: float) -> dict:
    torch.manual_seed(0)
    if config == "tta_m10":
        cfg = ZipformerConfig.tta_m10()
    else:
        cfg = ZipformerConfig.from_json(SMALL_CONFIG)
    encoder = ZipformerEncoder(cfg).eval()
    samples = int(seconds * data.SAMPLE_RATE)
    wave = 0.1 * torch.randn(samples, generator=torch.Generator().manual_seed(0))
    before = rss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        feats, lens = data.fbank([wave])
        out, _ = encoder(feats, lens)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"config": config, "seconds": seconds, "frames": int(out.shape[1]),
            "time_s": elapsed, "peak_over_start_mib": peak - before}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["small", "tta_m10"], default="small")
    p.add_argument("--seconds", type=float, nargs="+", default=[10, 30, 60, 120])
    p.add_argument("--threads", type=int, default=2)
    # internal: run one length and print JSON
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.config, args.seconds[0])))
        return
    print(f"encoder {args.config}, CPU fp32, {args.threads} threads, torch {torch.__version__}\n")
    print("| audio (s) | encoder frames | time (s) | peak memory over start (MiB) "
          "| MiB per minute of audio |")
    print("|---:|---:|---:|---:|---:|")
    for seconds in args.seconds:
        cmd = [sys.executable, __file__, "--case", "--config", args.config,
               "--seconds", str(seconds), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.splitlines()[-1])
        peak = r["peak_over_start_mib"]
        print(f"| {seconds:g} | {r['frames']} | {r['time_s']:.2f} | {peak:.0f} | "
              f"{peak * 60 / seconds:.0f} |", flush=True)


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
