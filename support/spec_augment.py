"""Support for train.py: SpecAugment on fbank (Park et al. 2019) as the official recipe runs it.

The recipe augments with Lhotse's SpecAugment at Lhotse's default settings, so this is Lhotse's
rule rewritten in torch: a time warp, then frequency and time masks filled with the utterance's
mean. The encoders are frozen, so it only regularises the projectors: they see slightly damaged
encoder outputs and must still produce the target. It is a detail of the training recipe, not
the AZeroS method, so it lives here beside train.py, which applies it to each batch's fbank
before the encoders.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class SpecAugment:
    """Lhotse's SpecAugment with the official recipe's settings. Per utterance, on its own frames:

    - time warp (probability p): a random centre frame c (at least `time_warp` frames from either
      end) moves to w, up to `time_warp` frames away; both sides are resized with bicubic
      interpolation. Clips of at most 2 * time_warp + 1 frames (1.6 s) are not warped.
    - masks (a second, independent draw with probability p), filled with the utterance's mean:
      `freq_masks` bands of 0..freq_width-1 bins, and n = min(time_masks, ceil(M / time_width))
      spans of 0..min(time_width, M // n) - 1 frames, where M = max_time_fraction * frames, so the
      spans cannot add up to more than 15% of the utterance."""
    time_warp: int = 80
    freq_masks: int = 2
    freq_width: int = 27
    time_masks: int = 10
    time_width: int = 100
    max_time_fraction: float = 0.15
    p: float = 0.9

    def __call__(self, feats: torch.Tensor, feat_lens: torch.Tensor,
                 gen: torch.Generator) -> torch.Tensor:
        """(B, T, F) fbank -> augmented copy; padding frames are left alone. All random numbers come
        from `gen` (a CPU generator), so a resumed run draws the same augmentation."""
        feats = feats.clone()
        for b, n in enumerate(feat_lens.tolist()):
            if n == 0:
                continue
            x = feats[b, :n]
            if rand(gen) < self.p:
                x = self.warp(x, gen)
            if rand(gen) < self.p:
                x = self.mask(x, gen)
            feats[b, :n] = x
        return feats

    def warp(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        T, W = x.shape[0], self.time_warp
        if W < 1 or T - W <= W + 1:
            return x
        centre = randint(W + 1, T - W, gen)
        moved = randint(centre - W, centre + W + 1, gen)
        if moved == centre:
            return x
        img = x[None, None]  # (1, 1, T, F): interpolate resizes the last two dimensions
        left = F.interpolate(img[:, :, :centre], size=(moved, x.shape[1]), mode="bicubic",
                             align_corners=False)
        right = F.interpolate(img[:, :, centre:], size=(T - moved, x.shape[1]), mode="bicubic",
                              align_corners=False)
        return torch.cat([left, right], dim=2)[0, 0]

    def mask(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        fill = x.mean()  # x is already this utterance's own copy (__call__ cloned the batch)
        T, n_bins = x.shape
        for start, width in spans(self.freq_masks, self.freq_width, n_bins, gen):
            x[:, start:start + width] = fill
        budget = self.max_time_fraction * T  # at most this many frames masked in all
        count = min(self.time_masks, math.ceil(budget / self.time_width))
        width = min(self.time_width, int(budget // count)) if count else 0
        if width >= 1:
            for start, w in spans(count, width, T, gen):
                x[start:start + w] = fill
        return x


SPEC_AUGMENT = SpecAugment()  # the official recipe's settings (Lhotse's defaults)


def rand(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def randint(low: int, high: int, gen: torch.Generator) -> int:
    """Uniform in [low, high)."""
    return int(torch.randint(low, high, (), generator=gen))


def spans(count: int, max_width: int, size: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """Lhotse's masks: widths uniform in [0, max_width), starts uniform where the span fits."""
    widths = torch.randint(0, max_width, (count,), generator=gen)
    starts = (torch.rand(count, generator=gen) * (size - widths)).long()
    return list(zip(starts.tolist(), widths.tolist()))
