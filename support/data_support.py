"""Support module (not the method): data.py's input checks.

data.py reads as the method, wav -> waveform -> fbank -> batches. What keeps it safe lives here:
  1. Audio: every way reading a segment can fail (missing, unreadable, empty, NaN/Inf, no such
     channel) becomes one `AudioError` naming the file and the reason.
  2. Feature input: `padded_batch` turns what `fbank` accepts into one (B, N) tensor and (B,)
     lengths, refusing shapes that cannot be waveforms.
The batch sampler's plan and bookkeeping are support/sampler.py's.
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch

from support.checks import CheckError

# --------------------------------------------------------------------------------------------------
# 1. Audio
# --------------------------------------------------------------------------------------------------


# The largest |sample| whose Kaldi fbank (data.fbank) stays finite in float32. In a 400-sample frame
# DC removal at most doubles a sample, pre-emphasis adds 0.97 of its neighbour and the window is at
# most 1, so each of the 257 FFT bins has |X| <= 400 * 2 * 1.97 * A, and a mel filter sums at most
# 257 squared bins: 257 * (1576 A)^2 < float32's max for A < 7.3e14. Float audio is meant to lie in
# [-1, 1]; a file of finite samples of 1e30 made an Inf fbank, and NaN training.
MAX_SAMPLE = math.sqrt(float(np.finfo(np.float32).max) / 257) / (400 * 2 * (1 + 0.97))


class AudioError(CheckError):
    """Audio that cannot be used: missing, unreadable, empty or NaN/Inf. Names path and reason."""

    def __init__(self, path, reason: str | None = None):
        if reason is None:
            # Raised in a DataLoader worker, torch re-raises it in the main process from one
            # message, the worker's traceback, whose last line is "...AudioError: <path>: <reason>".
            # Without this the error became a RuntimeError and a traceback (--num-workers > 0).
            last = str(path).strip().splitlines()[-1]
            path, _, reason = last.split(": ", 1)[-1].partition(": ")
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@contextlib.contextmanager
def audio_errors(path):
    """Around a libsndfile read: a missing or unreadable file raises AudioError naming it."""
    import soundfile as sf  # imported here: fbank and the sampler work without libsndfile

    if os.path.isdir(path):
        raise AudioError(path, "a folder, not an audio file")
    if not os.path.isfile(path):
        raise AudioError(path, "file not found")
    try:
        yield
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise AudioError(path, f"unreadable ({e})") from e


def check_samples(path, samples: np.ndarray, offset: float, channel: int | None) -> None:
    """(N, channels) samples just read: refuse none at all, NaN/Inf, samples too large for the
    fbank, or a missing channel."""
    if samples.shape[0] == 0:
        where = f" at offset {offset} s" if offset else ""
        raise AudioError(path, f"empty (0 samples{where})")
    if not np.isfinite(samples).all():
        raise AudioError(path, "contains NaN or Inf samples")
    peak = float(np.abs(samples).max())
    if peak > MAX_SAMPLE:
        raise AudioError(path, f"samples reach {peak:.3g}; past {MAX_SAMPLE:.2g} the float32 fbank "
                         "overflows to Inf (float audio lies in [-1, 1])")
    if channel is not None and channel >= samples.shape[1]:
        raise AudioError(path, f"has {samples.shape[1]} channel(s), channel {channel} requested")


def check_resample(wave: torch.Tensor, orig_freq, new_freq) -> None:
    if int(orig_freq) != orig_freq or int(new_freq) != new_freq or orig_freq <= 0 or new_freq <= 0:
        raise ValueError("resample: sample rates must be positive integers, "
                         f"got {orig_freq} -> {new_freq}")
    if not wave.is_floating_point():
        raise TypeError(f"resample: expected a float waveform, got {wave.dtype}")


# --------------------------------------------------------------------------------------------------
# 2. Feature input
# --------------------------------------------------------------------------------------------------


def padded_batch(waves, lengths, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of 1-D waveforms, one 1-D waveform or a padded (B, N) tensor -> ((B, N), (B,))."""
    if isinstance(waves, torch.Tensor):
        batch = waves[None] if waves.dim() == 1 else waves
        if batch.dim() != 2:
            raise ValueError("expected a (B, N) batch of waveforms, "
                             f"got shape {tuple(batch.shape)}")
        batch = batch.to(device=device or batch.device, dtype=dtype)
        full = [batch.shape[1]] * batch.shape[0]
    else:
        waves = [torch.as_tensor(w, dtype=dtype) for w in waves]
        for i, w in enumerate(waves):
            if w.dim() != 1:
                raise ValueError(f"waveform {i} must be 1-D (mono), got shape {tuple(w.shape)}")
        full = [len(w) for w in waves]
        device = device or (waves[0].device if waves else "cpu")
        batch = torch.zeros(len(waves), max(full, default=0), device=device, dtype=dtype)
        for i, w in enumerate(waves):
            batch[i, : len(w)] = w.to(device)
    lengths = torch.as_tensor(full if lengths is None else lengths, dtype=torch.long,
                              device=batch.device)
    if len(lengths) != batch.shape[0] or (len(lengths) and int(lengths.max()) > batch.shape[1]):
        raise ValueError(f"lengths {lengths.tolist()} do not fit a batch of shape "
                         f"{tuple(batch.shape)}")
    return batch, lengths
