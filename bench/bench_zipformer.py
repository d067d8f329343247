"""Zipformer2 encoder speed: forward throughput and peak memory, TTA-m10 size (152.7M params),
random weights.

Workload: one batch of 4 utterances of 10.0, 8.7, 7.3 and 6.0 s (100 Hz fbank, 320 s of audio per
10 batches). Each case runs in a fresh subprocess so that its peak memory is its own:
  - batched:   one padded, batch-invariant forward of the whole batch (what the speech LLM does);
  - per-utt:   the reference, the same 4 utterances one at a time (no padding at all).
Both are checked against each other (max abs diff on valid frames) in the parent process.

CPU: fp32. CUDA (when available): fp32 and bf16 autocast. Peak memory is the process's peak RSS on
CPU (model weights included) and torch.cuda.max_memory_allocated on CUDA.

    python -m bench.bench_zipformer            # all cases available here
    python -m bench.bench_zipformer --repeats 5 --threads 1

CPU timings are only meaningful on an otherwise idle machine: with other processes on the same
cores, PyTorch's worker threads are descheduled mid-op and a forward can take 10x longer. The table
reports the best of `--repeats` timed runs for that reason.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from support import checks
from zipformer import ZipformerConfig, ZipformerEncoder

LENGTHS_S = [10.0, 8.7, 7.3, 6.0]


def make_batch(device):
    g = torch.Generator().manual_seed(0)
    x_lens = torch.tensor([int(s * 100) for s in LENGTHS_S])
    x = torch.randn(len(x_lens), int(x_lens.max()), 80, generator=g) * 2 - 8
    return x.to(device), x_lens.to(device)


def build(device):
    torch.manual_seed(0)
    return ZipformerEncoder(ZipformerConfig.tta_m10()).to(device).eval()


def run_case(device: str, dtype: str, mode: str, repeats: int, save: str | None) -> dict:
    """Time `repeats` forwards after one warm-up; return the best seconds per batch and peak
    memory."""
    model, (x, x_lens) = build(device), make_batch(device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16")

    def forward():
        if mode == "batched":
            return [model(x, x_lens)[0]]
        return [model(x[i : i + 1, : int(n)], x_lens[i : i + 1])[0] for i, n in enumerate(x_lens)]

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad(), autocast:
        outs = forward()  # warm-up (also the output we compare)
        sync()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            forward()
            sync()
            times.append(time.perf_counter() - t0)
        sec = min(times)
    if device.startswith("cuda"):
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if save:
        torch.save([o.float().cpu() for o in outs], save)
    return {"sec_per_batch": sec, "peak_mib": peak_mib}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads (default: PyTorch's choice)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: device,dtype,mode,save_path
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        device, dtype, mode, save = args.case.split(",")
        print(json.dumps(run_case(device, dtype, mode, args.repeats, save)))
        return

    cases = [("cpu", "fp32")]
    if torch.cuda.is_available():
        cases += [("cuda", "fp32"), ("cuda", "bf16")]
    audio_s = sum(LENGTHS_S)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in ZipformerEncoder(ZipformerConfig.tta_m10()).parameters())
    print(f"Zipformer2 TTA-m10 config, {n_params / 1e6:.1f}M params, random weights; "
          f"batch of 4 x {LENGTHS_S} s")
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}", end="")
    print(f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    print("| device | dtype | mode | s / batch (best) | audio s / s | peak memory (MiB) "
          "| max abs diff vs per-utt |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    tmp = Path("/tmp") if Path("/tmp").exists() else Path(".")
    for device, dtype in cases:
        res, outs = {}, {}
        for mode in ("per-utt", "batched"):
            save = tmp / f"zipformer_bench_{device}_{dtype}_{mode}.pt"
            cmd = [sys.executable, __file__, "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--case", f"{device},{dtype},{mode},{save}"]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            res[mode] = json.loads(done.stdout)
            outs[mode] = torch.load(save, weights_only=True)
            save.unlink()
        ref = outs["per-utt"]
        batched = outs["batched"][0]
        diff = max((batched[i, : r.shape[1]] - r[0]).abs().max().item() for i, r in enumerate(ref))
        for mode in ("per-utt", "batched"):
            r = res[mode]
            d = f"{diff:.2e}" if mode == "batched" else "(reference)"
            sec = r["sec_per_batch"]
            print(f"| {device} | {dtype} | {mode} | {sec:.3f} | {audio_s / sec:.1f} "
                  f"| {r['peak_mib']:.0f} | {d} |")


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
