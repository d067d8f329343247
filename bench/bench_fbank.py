"""Throughput of data.fbank (batched) against the per-utterance Kaldi implementations.

    python -m bench.bench_fbank [--device cpu|cuda] [--repeats 5] [--num 32]

32 utterances of random length 2-20 s (seeded). Contenders, all in this process on the same data:
  - data.fbank: the whole batch at once (one gather, one rfft, one matmul);
  - kaldi-native-fbank (C++), one utterance at a time, the way the official pipeline's
    kaldifeat/lhotse fallback is called;
  - torchaudio.compliance.kaldi.fbank, one utterance at a time (when torchaudio is installed; the
    project itself does not need it).
Each is timed `--repeats` times after a warm-up; the median is reported. "speed vs ours" > 1 means
that contender is faster than data.fbank.
"""
import argparse
import importlib.util
import statistics
import sys
import time

import numpy as np
import torch

import data
from support import checks


def knf_loop(waves):
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0
    opts.frame_opts.snip_edges = False
    opts.frame_opts.samp_freq = data.SAMPLE_RATE
    opts.mel_opts.num_bins = 80
    opts.mel_opts.high_freq = -400
    out = []
    for w in waves:
        online = knf.OnlineFbank(opts)
        online.accept_waveform(data.SAMPLE_RATE, w.numpy())
        online.input_finished()
        out.append(np.stack([online.get_frame(i) for i in range(online.num_frames_ready)]))
    return out


def torchaudio_loop(waves):
    from torchaudio.compliance.kaldi import fbank as ta_fbank

    return [ta_fbank(w[None], num_mel_bins=80, dither=0.0, snip_edges=False, high_freq=-400.0,
                     sample_frequency=data.SAMPLE_RATE) for w in waves]


def timed(fn, repeats, sync=lambda: None):
    fn()  # warm-up (caches, lazy imports, CUDA kernels)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num", type=int, default=32)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    lengths = rng.uniform(2.0, 20.0, args.num)
    noise = (0.1 * rng.standard_normal(int(s * data.SAMPLE_RATE)) for s in lengths)
    waves = [torch.from_numpy(n.astype(np.float32)) for n in noise]
    audio_s = float(sum(len(w) for w in waves)) / data.SAMPLE_RATE
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # Sanity first: all three agree on these signals.
    ours, lens = data.fbank(waves, device=device)
    ref = knf_loop(waves)
    max_diff = max(float(np.abs(ours[i, : lens[i]].cpu().numpy() - r).max())
                   for i, r in enumerate(ref))

    batched = timed(lambda: data.fbank(waves, device=device), args.repeats, sync)
    results = [
        (f"data.fbank, batched ({args.device})", batched),
        ("kaldi-native-fbank, per utterance (cpu)", timed(lambda: knf_loop(waves), args.repeats)),
    ]
    if importlib.util.find_spec("torchaudio") is not None:
        results.append(("torchaudio.compliance.kaldi.fbank, per utt (cpu)",
                        timed(lambda: torchaudio_loop(waves), args.repeats)))
    ours_t = results[0][1]
    print(f"{args.num} utterances, {audio_s:.1f} s of audio "
          f"({lengths.min():.1f}-{lengths.max():.1f} s each); torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; median of {args.repeats}")
    print(f"max |data.fbank - kaldi-native-fbank| on these signals: {max_diff:.2e}")
    print()
    print(f"| {'implementation':<50} | {'time (ms)':>9} | {'audio s / s':>11} "
          f"| {'speed vs ours':>13} |")
    print(f"|{'-' * 52}|{'-' * 10}:|{'-' * 12}:|{'-' * 14}:|")
    for name, t in results:
        print(f"| {name:<50} | {t * 1e3:>9.1f} | {audio_s / t:>11.0f} | {ours_t / t:>12.2f}x |")


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
