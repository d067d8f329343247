"""The data chapter: wav -> 16 kHz waveform -> 80-bin fbank -> batches (AZeroS paper, Sec. 4.1).

Everything the frozen encoders see passes through this file (the top of model.py's diagram):

    Record --load_audio--> (N,) float32 waveform, 16 kHz mono in [-1, 1]
           --fbank-->      (B, T, 80) Kaldi log-mel at 100 frames/s, T = round(N / 160)
           --> zipformer.py (frozen) --> (B, ~T/4, D) at 25 Hz

A Record is one manifest line: where the audio is (path, offset, duration, channel), its text and
metadata and, after generate_targets.py, the SIFT target. Training draws index batches of similar
length from `DurationBucketSampler`; `AudioDataset` reads their audio in the DataLoader workers;
`collate` keeps the waveforms a list, because `fbank` pads them itself, on the GPU.

The encoders were trained on Kaldi filterbanks from kaldifeat/lhotse (`snip_edges=False`,
`high_freq=-400`, dither 0, float input in [-1, 1]), and a frozen encoder only works on the features
it was trained on, so `fbank` re-implements the Kaldi recipe, batched. It matches kaldi-native-fbank
to within 1e-3 (tests/test_data_fbank.py): float32 FFT rounding in very weak mel bins, where
kaldi-native-fbank is itself ~1e-3 away from an exact float64 computation.

Support (not the method): support/manifest.py reads and validates manifests (and runs
`python data.py check m.jsonl ...`); support/data_support.py checks audio and fbank input;
support/sampler.py plans the duration-bucketed batches (DDP, exact resume); support/checks.py
checks audio files before long jobs.
"""
from __future__ import annotations

import math
import sys
from functools import lru_cache

import numpy as np
import torch

from support import data_support, sampler

# Re-exported so that `data.read_manifest`, `data.AudioError` etc. keep working.
from support.data_support import AudioError  # noqa: F401
from support.manifest import ManifestError, Record, read_manifest, write_manifest  # noqa: F401

SAMPLE_RATE = 16000
# Padded feature frames hold log(1e-10) (about -23.03), the value the official `extract_features`
# pads with. It is far below anything a real frame can reach (the log floor is log(FLT_EPSILON) =
# -15.94), so padding looks like "deeper than silence" and never like speech. Matching it matters
# because the official batched Zipformer lets a little padding leak into real frames.
LOG_ZERO = math.log(1e-10)

# Kaldi fbank options the released encoders were trained with (official features.py / kaldifeat).
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms
FFT_SIZE = 512  # frame length rounded up to a power of two
NUM_MEL_BINS = 80
LOW_FREQ = 20.0
HIGH_FREQ = SAMPLE_RATE / 2 - 400.0  # Kaldi's high_freq=-400 is "400 Hz below Nyquist": 7600 Hz
PREEMPH = 0.97
# Kaldi floors the mel energies at FLT_EPSILON before the log, so digital silence gives -15.94.
LOG_FLOOR = float(torch.finfo(torch.float32).eps)

# torchaudio.functional.resample's defaults, which the official pipeline resamples with.
RESAMPLE_ZERO_CROSSINGS = 6  # the sinc is cut after 6 zero crossings on each side ...
RESAMPLE_ROLLOFF = 0.99  # ... and its cut-off sits at 99% of the lower Nyquist frequency


# --------------------------------------------------------------------------------------------------
# 1. Audio: read a segment, make it 16 kHz mono
# --------------------------------------------------------------------------------------------------


def load_audio(path, offset: float = 0.0, duration: float | None = None,
               channel: int | None = None) -> torch.Tensor:
    """Read `duration` seconds starting at `offset` seconds -> float32 (N,) mono waveform at 16 kHz.

    Any format libsndfile reads (wav, flac, ogg, mp3 with libsndfile >= 1.1). Integer PCM is scaled
    to [-1, 1] by soundfile (int16 / 32768), the scaling of the official pipeline's torchaudio.load.
    Multi-channel audio is averaged to mono, unless `channel` picks one channel (the official
    `features.py` takes channel 0 when it reads paths itself). Other sample rates are resampled with
    torchaudio's default windowed-sinc filter (`resample` below), as the official pipeline does.
    """
    import soundfile as sf  # imported here: fbank and the sampler work without libsndfile

    with data_support.audio_errors(path), sf.SoundFile(path) as f:  # missing/unreadable: AudioError
        sr = f.samplerate
        start = int(round(offset * sr))
        frames = -1 if duration is None else int(round(duration * sr))
        if start > 0:
            f.seek(min(start, f.frames))
        data = f.read(frames=frames, dtype="float32", always_2d=True)  # (N, channels)
    data_support.check_samples(path, data, offset, channel)  # empty, NaN/Inf, no such channel
    if channel is not None:
        wave = torch.from_numpy(np.ascontiguousarray(data[:, channel]))
    else:
        wave = torch.from_numpy(data.mean(axis=1, dtype=np.float32))
    return resample(wave, sr, SAMPLE_RATE)


def resample(wave: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """(..., N) float waveforms at `orig_freq` Hz -> (..., ceil(N * new / orig)) at `new_freq` Hz.

    The same windowed-sinc filter as torchaudio.functional.resample with its defaults (within float
    rounding), written out so the project does not need torchaudio. Rates must be positive integers.
    """
    data_support.check_resample(wave, orig_freq, new_freq)
    if orig_freq == new_freq:
        return wave
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    kernel, half_width = resample_kernel(orig, new, wave.dtype)
    kernel = kernel.to(wave.device)
    shape, length = wave.shape[:-1], wave.shape[-1]
    x = torch.nn.functional.pad(wave.reshape(-1, 1, length), (half_width, half_width + orig))
    y = torch.nn.functional.conv1d(x, kernel, stride=orig)  # (B, new phases, blocks)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)  # interleave the phases: block 0 phase 0, 1, ...
    return y[:, : math.ceil(new * length / orig)].reshape(*shape, -1)


@lru_cache(maxsize=16)
def resample_kernel(orig: int, new: int,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """The (new, 1, taps) polyphase filter bank for resampling by new/orig (rates already divided by
    their gcd), and how many input samples of padding it needs on the left.

    Ideal band-limited resampling evaluates x(t) = sum_i x[i] sinc(pi (t - i)) (t in input samples)
    at the output times t_j = j * orig / new. Output j + new sits exactly `orig` input samples after
    output j, so it uses the same weights shifted by `orig`: `new` filters, applied with stride
    `orig`, give every output. Each filter is a Hann-windowed sinc low-passed at RESAMPLE_ROLLOFF *
    min(orig, new) (in units where the input rate is `orig`), so downsampling cannot alias.
    """
    cutoff = min(orig, new) * RESAMPLE_ROLLOFF
    half_width = math.ceil(RESAMPLE_ZERO_CROSSINGS * orig / cutoff)  # taps each side of the centre
    # Time from output phase j to each input tap, in units of the input rate `orig` ...
    taps = torch.arange(-half_width, half_width + orig, dtype=dtype) / orig
    t = torch.arange(0, -new, -1, dtype=dtype)[:, None, None] / new + taps
    # ... then in units of the cut-off period, where the sinc has its zeros at the integers.
    t = (t * cutoff).clamp(-RESAMPLE_ZERO_CROSSINGS, RESAMPLE_ZERO_CROSSINGS)
    window = torch.cos(t * math.pi / RESAMPLE_ZERO_CROSSINGS / 2) ** 2  # Hann, zero at the cuts
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones((), dtype=dtype), t.sin() / t)
    return sinc * (window * (cutoff / orig)), half_width  # cutoff/orig keeps a DC gain of one


# --------------------------------------------------------------------------------------------------
# 2. The Kaldi filterbank
# --------------------------------------------------------------------------------------------------


def num_frames(num_samples: int) -> int:
    """Kaldi's frame count with snip_edges=False: one frame per 10 ms, rounded to the nearest
    frame. (snip_edges=True would give 1 + (n - 400) // 160, losing the partial last frames.)"""
    return (num_samples + FRAME_SHIFT // 2) // FRAME_SHIFT


def duration_frames(durations) -> list[int]:
    """num_frames of each duration in seconds (what a batch of them pads to: the max)."""
    return [num_frames(int(round(d * SAMPLE_RATE))) for d in durations]


@torch.no_grad()
def fbank(waves, lengths=None, device=None,
          dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """80-bin Kaldi log-mel filterbank of a batch of 16 kHz waveforms (floats in [-1, 1]).

    `waves` is a list of 1-D tensors, or a padded (B, N) tensor with `lengths` (B,). Returns
    feats (B, T, 80) float32 and feat_lens (B,) int64, T = max(feat_lens); frames past an
    utterance's end hold LOG_ZERO. Runs on `device` (default: where the waves are). `dtype` is the
    precision of the arithmetic (float32 like kaldifeat/kaldi-native-fbank; float64 for reference
    checks); the result is float32 either way.

    The whole batch is done in a few tensor ops: one gather builds the edge-reflected signals,
    frames are strided views of them, then DC removal, pre-emphasis and window, one rfft, one matmul
    with the mel matrix, log. Per utterance this is Kaldi's ComputeFbank with the options above.
    """
    batch, lens = data_support.padded_batch(waves, lengths, device, dtype)  # (B, N), (B,)
    frame_lens = num_frames(lens)  # the same integer arithmetic on a (B,) tensor
    bsz, max_t = batch.shape[0], int(frame_lens.max()) if len(frame_lens) else 0
    if max_t == 0:
        return torch.full((bsz, 0, NUM_MEL_BINS), LOG_ZERO, device=batch.device), frame_lens

    window, mel = _constants(batch.device, batch.dtype)
    signal = _extended_signal(batch, lens, max_t)
    frames = signal.unfold(1, FRAME_LENGTH, FRAME_SHIFT)  # (B, T, 400), a view

    frames = frames - frames.mean(dim=-1, keepdim=True)  # remove each frame's DC offset
    # Pre-emphasis y[i] = x[i] - 0.97 x[i-1] boosts the high frequencies; inside a frame Kaldi uses
    # x[-1] := x[0], so y[0] = 0.03 x[0].
    emph = frames.clone()
    emph[..., 1:] -= PREEMPH * frames[..., :-1]
    emph[..., 0] *= 1 - PREEMPH
    emph *= window

    spectrum = torch.fft.rfft(emph, n=FFT_SIZE)  # zero-pads 400 -> 512 samples: (B, T, 257) complex
    # Power spectrum and mel filtering in one matmul: (re, im) pairs squared, each mel weight
    # repeated for both halves of the pair.
    power_parts = torch.view_as_real(spectrum).square().flatten(-2)  # (B, T, 514)
    feats = torch.matmul(power_parts, mel).clamp_min(LOG_FLOOR).log()  # (B, T, 80)

    padding = torch.arange(max_t, device=batch.device)[None, :] >= frame_lens[:, None]
    return feats.masked_fill(padding[..., None], LOG_ZERO).float(), frame_lens


def mel_matrix() -> np.ndarray:
    """(FFT_SIZE // 2 + 1, NUM_MEL_BINS) matrix of Kaldi's triangular mel filters.

    Kaldi places NUM_MEL_BINS + 2 equally spaced points on the mel scale between LOW_FREQ and
    HIGH_FREQ; filter m rises linearly (in mel, not Hz) from point m to m + 1 and falls to m + 2.
    The filters are not area-normalised (unlike librosa's "slaney" norm). The Nyquist row stays 0
    because Kaldi only looks at the first FFT_SIZE // 2 bins.
    """
    fft_mels = _mel_scale(np.arange(FFT_SIZE // 2) * SAMPLE_RATE / FFT_SIZE)  # (256,)
    lo, hi = _mel_scale(LOW_FREQ), _mel_scale(HIGH_FREQ)
    points = lo + np.arange(NUM_MEL_BINS + 2) * (hi - lo) / (NUM_MEL_BINS + 1)
    left, center, right = points[:-2, None], points[1:-1, None], points[2:, None]  # (80, 1) each
    rising = (fft_mels - left) / (center - left)
    falling = (right - fft_mels) / (right - center)
    inside = (fft_mels > left) & (fft_mels < right)
    weights = np.where(inside, np.where(fft_mels <= center, rising, falling), 0.0)
    out = np.zeros((FFT_SIZE // 2 + 1, NUM_MEL_BINS))
    out[: FFT_SIZE // 2] = weights.T
    return out


def _mel_scale(freq):
    return 1127.0 * np.log(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def povey_window() -> np.ndarray:
    """Kaldi's default "povey" window: a Hann window raised to 0.85 (never quite zero inside)."""
    n = np.arange(FRAME_LENGTH)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / (FRAME_LENGTH - 1))) ** 0.85


@lru_cache(maxsize=16)
def _constants(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Window and mel matrix, built once per device/dtype (rebuilding them every batch costs a
    host-to-device copy each time)."""
    window = torch.tensor(povey_window(), device=device, dtype=dtype)
    # each row twice: the rows meet the interleaved (re^2, im^2) of every FFT bin, see fbank()
    mel = torch.tensor(np.repeat(mel_matrix(), 2, axis=0), device=device, dtype=dtype)
    return window, mel


def _extended_signal(batch: torch.Tensor, lengths: torch.Tensor, max_frames: int) -> torch.Tensor:
    """(B, P) samples the frames read from: frame t is ext[:, 160 t : 160 t + 400].

    With snip_edges=False Kaldi centres frame t at sample 160 t + 80, so the first window starts
    LEFT = 120 samples before the signal and the last one runs up to RIGHT = 200 samples past its
    end. Instead of zero-padding, Kaldi mirrors the signal there: zeros would add a spurious step at
    the edges. We pad every row by LEFT and RIGHT, then overwrite just those edge samples (each row
    has its own end) with the mirrored ones, a gather of B x 320 values instead of B x P.
    """
    left = FRAME_LENGTH // 2 - FRAME_SHIFT // 2  # 120
    right = FRAME_LENGTH // 2 + FRAME_SHIFT // 2  # 200: the last frame ends before sample n + 200
    ext = torch.nn.functional.pad(batch, (left, right))
    n = lengths[:, None]
    before = torch.arange(-left, 0, device=batch.device).expand(len(n), -1)
    outside = torch.cat([before, n + torch.arange(right, device=batch.device)], dim=1)  # (B, 320)
    ext.scatter_(1, outside + left, batch.gather(1, _reflect(outside, n)))
    return ext[:, : (max_frames - 1) * FRAME_SHIFT + FRAME_LENGTH]


def _reflect(index: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Kaldi's edge rule for snip_edges=False: read x[-1] = x[0], x[-2] = x[1], ..., x[n] = x[n-1].

    Mirroring at both ends repeats with period 2n, which also covers signals shorter than a window
    (Kaldi's loop reflects again and again), so one modulo does it. `n` is clamped to 1 to avoid a
    modulo by zero (an empty utterance has no frames anyway)."""
    n = n.clamp(min=1)
    index = torch.remainder(index, 2 * n)
    return torch.where(index >= n, 2 * n - 1 - index, index)


# --------------------------------------------------------------------------------------------------
# 3. Batching: duration-bucketed sampler, dataset, collate
# --------------------------------------------------------------------------------------------------


class DurationBucketSampler(sampler.BucketSampler):
    """Batches of utterances of similar length, for `DataLoader(batch_sampler=...)`: lists of
    global indices into the concatenated manifests, each batch padded to its longest utterance and
    capped in padded seconds (`max_duration`), rows (`max_batch`) and, with `max_tokens`, padded
    LLM tokens. One epoch's plan (mixing by weight, duration buckets, greedy packing, shuffled
    batches dealt round-robin to the DDP ranks) and the exact mid-epoch resume are
    support/sampler.py's; nothing is dropped silently.
    """

    @property
    def padding_efficiency(self) -> float:
        """Real frames / padded frames over this rank's batches of the current epoch."""
        real = padded = 0
        for batch in self.epoch_batches():
            frames = duration_frames(self.all_durations[i] for i in batch)
            real, padded = real + sum(frames), padded + max(frames) * len(frames)
        return real / padded if padded else 1.0


class AudioDataset(torch.utils.data.Dataset):
    """Records -> (Record, 16 kHz waveform). Audio is read lazily, in the DataLoader workers:
    exactly `duration` seconds from `offset`, the way Lhotse reads a cut."""

    def __init__(self, records: list[Record]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        return rec, load_audio(rec.audio, rec.offset, rec.duration, channel=rec.channel)


def collate(items) -> dict:
    """[(Record, wave), ...] -> {"waves": [(N_i,) tensors], "wave_lens": (B,) int64, "records"}.

    Waveforms stay a list: `fbank` pads them itself, on the GPU, so the workers do no feature work
    and the Records carry every field the prompt needs (text, meta, instruction, response...).
    """
    records = [rec for rec, _ in items]
    waves = [wave for _, wave in items]
    wave_lens = torch.tensor([len(w) for w in waves], dtype=torch.long)
    return {"waves": waves, "wave_lens": wave_lens, "records": records}


def padding_efficiency(durations) -> float:
    """Real frames / padded frames for one batch of utterance durations (1.0 = no padding at all).
    A batch is padded to its longest utterance, so this is sum(frames) / (max(frames) * count)."""
    frames = duration_frames(durations)
    return sum(frames) / (max(frames) * len(frames)) if frames and max(frames) else 1.0


if __name__ == "__main__":  # python data.py check m.jsonl ...: see support/manifest.py
    from support import manifest

    sys.exit(manifest.cli())
