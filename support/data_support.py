"""Support module (not the method): data.py's input checks and its sampler's bookkeeping.

data.py reads as the method, wav -> waveform -> fbank -> batches. What keeps it safe lives here:
  1. Audio: every way reading a segment can fail (missing, unreadable, empty, NaN/Inf, no such
     channel) becomes one `AudioError` naming the file and the reason.
  2. Feature input: `padded_batch` turns what `fbank` accepts into one (B, N) tensor and (B,)
     lengths, refusing shapes that cannot be waveforms.
  3. Sampler: argument checks, the DDP rule that gives every rank the same number of steps, and
     `ResumableSampler`, the DataLoader protocol that resumes exactly in the middle of an epoch.
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


# --------------------------------------------------------------------------------------------------
# 3. Sampler
# --------------------------------------------------------------------------------------------------


def check_sampler(weights: list[float], num_manifests: int, rank: int, world_size: int) -> None:
    if len(weights) != num_manifests:
        raise ValueError(f"{len(weights)} weights for {num_manifests} manifests")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0, got {weights}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")


def row_token_array(tokens, durations: list[np.ndarray], max_tokens: int) -> np.ndarray:
    """The sampler's per-row token counts, one flat int64 array over all manifests, checked: one
    list per manifest, one count per row, and no row over the budget (a row the budget cannot
    hold would otherwise be packed alone and run out of memory, or be dropped silently)."""
    if tokens is None:
        if max_tokens:
            raise ValueError("max_tokens needs the rows' token counts (tokens=)")
        return np.zeros(sum(len(d) for d in durations), dtype=np.int64)
    if len(tokens) != len(durations) or any(len(t) != len(d) for t, d in zip(tokens, durations)):
        raise ValueError(f"tokens: {[len(t) for t in tokens]} rows per manifest, durations: "
                         f"{[len(d) for d in durations]}")
    flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in tokens]) if tokens else \
        np.zeros(0, dtype=np.int64)
    if max_tokens and len(flat) and flat.max() > max_tokens:
        i = int(flat.argmax())
        raise ValueError(f"row {i} has {flat[i]} tokens, more than max_tokens {max_tokens}")
    return flat


def equalise_for_ranks(batches: list[list[int]], world_size: int,
                       drop_last: bool) -> tuple[list[list[int]], int]:
    """Make the number of batches a multiple of world_size -> (batches, utterances dropped).

    Every DDP rank must run the same number of steps, or the all-reduce of the last step waits
    forever. drop_last=False: the largest batches are split in two until the count divides, so
    every utterance is still used exactly once. drop_last=True: the last (count % world_size)
    batches are dropped, and the number of utterances they held is returned.
    """
    remainder = len(batches) % world_size
    if remainder == 0:
        return batches, 0
    if drop_last:
        dropped = batches[len(batches) - remainder:]
        return batches[: len(batches) - remainder], sum(len(b) for b in dropped)
    for _ in range(world_size - remainder):
        k = max(range(len(batches)), key=lambda j: len(batches[j]))
        if len(batches[k]) < 2:  # fewer utterances than ranks: nothing left to split
            raise ValueError(f"{sum(len(b) for b in batches)} utterances cannot fill "
                             f"{world_size} ranks; use drop_last=True or fewer ranks")
        half = len(batches[k]) // 2
        batches[k:k + 1] = [batches[k][:half], batches[k][half:]]
    return batches, 0


class ResumableSampler:
    """The DataLoader batch-sampler protocol over a subclass's `epoch_batches()` (this rank's
    batches of `self.epoch`, the same list on every call), resumable in the middle of an epoch.

    `state_dict()` is {"epoch", "batches_done"}; after `load_state_dict`, the next pass skips
    exactly `batches_done` batches of that epoch and yields the rest unchanged. With DataLoader
    workers the sampler runs ahead of training (prefetch), so save the number of batches the
    training loop actually consumed, not this object's own counter.
    """

    def __init__(self):
        self.epoch, self.batches_done = 0, 0
        self._num_dropped = 0  # set by epoch_batches(): what drop_last removed this epoch

    def epoch_batches(self) -> list[list[int]]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch`. Calling it again with the current epoch (e.g. right after
        load_state_dict) keeps the resume position."""
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def __iter__(self):
        batches = self.epoch_batches()
        for i in range(self.batches_done, len(batches)):
            self.batches_done = i + 1
            yield list(batches[i])
        self.batches_done = 0  # the epoch is complete; a new pass starts from its beginning

    def __len__(self) -> int:
        """Batches of the current epoch for this rank, including any a resume will skip."""
        return len(self.epoch_batches())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])

    @property
    def num_dropped(self) -> int:
        """Utterances (all ranks together) that drop_last=True removed from the current epoch."""
        self.epoch_batches()
        return self._num_dropped
