"""Train the AZeroS projectors with self-generated targets (AZeroS paper, Sec. 3.4 SIFT, Sec. 4.2 two stages).

SIFT (Self-generated Instruction-Free Tuning) needs no human instructions: for every utterance the frozen
LLM has already answered a *text* stand-in for the audio (generate_targets.py wrote that answer into the
manifest as `response`). Here we teach the projectors to make the *audio* version of the prompt produce
the same answer. Only the projectors learn; the Zipformer encoders and the LLM stay frozen. Two stages:

  stage 1  semantic encoder + projector; the prompt is just `<|AUDIO|>` standing for the transcript
           (targets: `sift_s`). Trains `speech_encoder_projector`.
  stage 2  adds the paralinguistic encoder; the prompt is
           `<audio><meta><|AUDIO|></meta><text><|AUDIO|></text></audio>` (targets: `sift_sp`, usually mixed
           with `sift_s`). Loads the stage-1 model, FREEZES its projector and trains only
           `paraling_encoder_projector`, so stage 2 cannot undo what stage 1 learnt.
  both     one stage instead (paper Table 6): fresh projectors for every encoder given, trained
           together on a mix such as sift_s + sift_sp. With a Whisper folder as the only encoder
           this is the Table 6 Whisper row.

    python train.py --stage 1 --llm Qwen/Qwen2.5-7B-Instruct --speech-encoder tta/ \\
        --train sift_s.jsonl --valid dev.jsonl --exp exp/stage1
    python train.py --stage 2 --init exp/stage1 --paraling-encoder voice/ \\
        --train sift_sp.jsonl:1 sift_s.jsonl:0.5 --valid dev.jsonl --exp exp/stage2
    torchrun --nproc_per_node=8 train.py ...        # same flags, DistributedDataParallel

The defaults are the official recipe's (examples/azeros/configs/train.yaml): Adam at 1e-3 with the Eden2
schedule, no gradient clipping, sequences cut at 512 tokens, Lhotse's SpecAugment, and a running average of
the weights every 200 steps, which is what the exported model holds. The README's "Differences from the
official code" lists where we deliberately differ.

The file reads top to bottom like nanoGPT's train.py: command line, distributed setup, data, model, the
few helpers the loop needs (learning-rate schedule, SpecAugment, encoder cache, checkpoints, weight
average), then the hand-written loop itself. No framework: every step of training is a line you can read here.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checks
from data import (
    SAMPLE_RATE,
    AudioDataset,
    AudioError,
    DurationBucketSampler,
    ManifestError,
    collate,
    padding_efficiency,
    read_manifest,
    write_atomic,
)


class TrainError(RuntimeError):
    """A problem the user can fix (bad manifest, wrong model combination, out of memory). The command line
    prints its message without a traceback."""


# ---------------------------------------------------------------------------------------------------
# 1. Command line
# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--stage", type=lambda s: s if s == "both" else int(s), choices=[1, 2, "both"],
                   required=True, help="1: semantic projector; 2: paralinguistic;\n"
                                       "both: every projector at once (one stage, paper Table 6)")
    g.add_argument("--llm", help="frozen LLM: HF folder, hub id or .gguf (stage 2: default the one in --init)")
    g.add_argument("--gguf-file", help="GGUF file name inside --llm")
    g.add_argument("--speech-encoder",
                   help="semantic encoder folder: a Zipformer, or a transformers Whisper folder\n"
                        "(stages 1 and both; stage 2 uses the one in --init)")
    g.add_argument("--paraling-encoder",
                   help="paralinguistic Zipformer folder (stage 2; optional with both)")
    g.add_argument("--init", help="stage 2: the stage-1 model folder (release layout, e.g. exp/stage1)")
    g = p.add_argument_group("data")
    g.add_argument("--train", nargs="+", required=True, metavar="JSONL[:WEIGHT]",
                   help="training manifests with responses (generate_targets.py output); WEIGHT 2 = each row\n"
                        "twice per epoch, 0.5 = a random half (default 1)")
    g.add_argument("--valid", nargs="*", default=[], metavar="JSONL", help="validation manifests")
    g.add_argument("--max-duration", type=float, default=200.0, help="padded seconds of audio per batch and rank")
    g.add_argument("--max-batch", type=int, default=64, help="utterances per batch at most")
    g.add_argument("--num-buckets", type=int, default=30, help="duration buckets of the sampler")
    g.add_argument("--max-length", type=int, default=512,
                   help="truncate token sequences to this length (official: 512; 0 = no limit)")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers reading audio")
    g.add_argument("--max-audio-seconds", type=float, default=checks.MAX_AUDIO_SECONDS,
                   help=checks.MAX_AUDIO_HELP)
    g.add_argument("--no-spec-augment", dest="spec_augment", action="store_false",
                   help="turn off SpecAugment (on by default, as the official recipe: Lhotse's time warp and\n"
                        "frequency/time masks on the fbank)")
    g.add_argument("--cache-encoders", metavar="DIR",
                   help="store frozen encoder outputs here; later epochs reuse them (needs --no-spec-augment)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-3, help="base learning rate of Adam (official recipe: 1e-3)")
    g.add_argument("--schedule", choices=["eden2", "linear"], default="eden2",
                   help="eden2 (official): lr * (1 + (step/--lr-batches)^2)^-0.5, warm-up from lr/2 over\n"
                        "--warmup-steps; linear: warm-up from 0, then linear decay to --min-lr at --decay-steps")
    g.add_argument("--lr-batches", type=float, default=7500, help="eden2: step at which lr has fallen by 1/sqrt(2)")
    g.add_argument("--warmup-steps", type=int, default=500, help="warm-up length (official eden2: 500)")
    g.add_argument("--min-lr", type=float, default=1e-5, help="linear: learning rate at the end of the decay")
    g.add_argument("--decay-steps", type=int, help="linear: step at which the decay reaches --min-lr (default: last)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="Adam's L2 weight decay (official: 0)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the global gradient norm (0: off, as official)")
    g.add_argument("--average-period", type=int, default=200,
                   help="every N steps fold the weights into a running uniform average, which is what the\n"
                        "final model holds (official use_averaged_model, average_period 200; 0: off)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-steps", type=int, help="optimizer steps to run (overrides --epochs)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the training data")
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("run")
    g.add_argument("--exp", required=True, help="output folder: checkpoints/, metrics.jsonl, the final model")
    g.add_argument("--device", help="cuda / cpu (default: cuda if available)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast precision (auto: bf16 on CUDA, fp32 on CPU; bf16 pays off on CPUs with "
                        "AVX512-BF16/AMX, see demo.py)")
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    g.add_argument("--valid-every", type=int, default=500, help="steps between validations (and one at the end)")
    g.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (and one at the end)")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                   help="continue from CKPT, or from the newest checkpoint in <exp>/checkpoints")
    g.add_argument("--log-batches", action="store_true",
                   help="write the ids of every batch to <exp>/batches.rankN.jsonl")
    g.add_argument("--overwrite", action="store_true", help="replace a finished model in --exp")
    args = p.parse_args(argv)
    checks.training_args(args)  # positive budgets, a device that exists, no finished model replaced
    return args


def parse_train_spec(spec: str) -> tuple[str, float]:
    """'a.jsonl:2' -> ('a.jsonl', 2.0); 'a.jsonl' -> ('a.jsonl', 1.0). Only a numeric suffix is a weight, so
    paths containing ':' still work."""
    path, sep, weight = spec.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


# ---------------------------------------------------------------------------------------------------
# 2. Distributed setup
# ---------------------------------------------------------------------------------------------------


def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python train.py` is rank 0 of 1.
    NCCL is the backend for GPUs, gloo for CPUs (the test suite runs 2 CPU ranks with gloo)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    kind = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{local_rank}") if kind == "cuda" else torch.device(kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over ranks (for logging and validation: every rank sees the global figure)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------
# 3. Data
# ---------------------------------------------------------------------------------------------------


def load_manifests(paths: list[str], what: str, max_audio_seconds: float | None = None) -> list:
    """Read manifests and refuse the mistakes that would otherwise surface as a crash deep inside a
    step (or, worse, as silent training on nothing): an empty manifest, rows without a target, and
    audio that is missing, shorter than its row says, or too long (from the file headers)."""
    manifests = []
    for path in paths:
        records = read_manifest(path)
        if not records:
            raise TrainError(f"{what} manifest {path} is empty: nothing to train on")
        missing = [r for r in records if r.response is None]
        if missing:
            raise TrainError(
                f"{what} manifest {path}: {len(missing)} of {len(records)} rows have no 'response' "
                f"(first: id {missing[0].id!r} at {missing[0].source}). SIFT trains on targets the frozen LLM "
                f"generated itself; make them first, e.g.\n"
                f"  python generate_targets.py --mode sift_s --model <LLM> --in {path} --out targets.jsonl\n"
                f"(stage 2: --mode sift_sp) and train on the output.")
        checks.training_rows(records, path, what, max_audio_seconds)
        manifests.append(records)
    return manifests


def make_loader(manifests, weights, args, rank, world, shuffle: bool):
    """DataLoader over the concatenated manifests, batched by the duration-bucketed sampler.

    The sampler decides everything (which utterances, in which batches, on which rank) from (seed, epoch),
    so all ranks agree without communicating, and a resumed run can skip straight to its position.
    The loader gets its own torch.Generator: otherwise creating an iterator draws a seed from the GLOBAL
    RNG, which would make the random stream depend on when the iterator was created (and break resume)."""
    records = [r for m in manifests for r in m]
    sampler = DurationBucketSampler([[r.duration for r in m] for m in manifests], weights=weights,
                                    max_duration=args.max_duration, max_batch=args.max_batch,
                                    num_buckets=args.num_buckets, seed=args.seed, rank=rank, world_size=world,
                                    shuffle=shuffle)
    loader = torch.utils.data.DataLoader(AudioDataset(records), batch_sampler=sampler, collate_fn=collate,
                                         num_workers=args.num_workers, generator=torch.Generator().manual_seed(0),
                                         pin_memory=torch.cuda.is_available())
    return loader, sampler


# ---------------------------------------------------------------------------------------------------
# 4. Model
# ---------------------------------------------------------------------------------------------------

TRAINED = {1: ["speech_encoder_projector"], 2: ["paraling_encoder_projector"],
           "both": ["speech_encoder_projector", "paraling_encoder_projector"]}


def build_model(args, device):
    """Stage 1 and "both": AZeroS.from_components (LLM + the encoders given, fresh projectors).
    Stage 2: AZeroS.from_stage1, the stage-1 model folder plus the paralinguistic encoder and a
    fresh paralinguistic projector; the stage-1 projector is loaded (and frozen by set_stage)."""
    from model import AZeroS  # imported here so `python train.py --help` is instant

    # bf16 weights for the frozen LLM on GPU (half the memory of fp32; autocast computes in bf16
    # anyway). The projectors stay fp32: they are the master weights Adam updates.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for flag, path in (("--speech-encoder", args.speech_encoder),
                       ("--paraling-encoder", args.paraling_encoder), ("--init", args.init)):
        if path and not Path(path).is_dir():
            raise TrainError(f"{flag} {path}: no such folder")
        if path and flag != "--init":
            checks.encoder_folder(path, flag)
    if args.stage in (1, "both"):
        if not (args.llm and args.speech_encoder):
            raise TrainError(f"stage {args.stage} needs --llm and --speech-encoder")
        paraling = args.paraling_encoder if args.stage == "both" else None
        model = AZeroS.from_components(args.llm, args.speech_encoder, paraling,
                                       gguf_file=args.gguf_file, device=device, dtype=dtype)
    else:
        if not (args.init and args.paraling_encoder):
            raise TrainError("stage 2 needs --init (the stage-1 model folder) and --paraling-encoder")
        init = Path(args.init)
        if not (init / "model.safetensors").exists():
            raise TrainError(f"--init {init}: no model.safetensors; expected a stage-1 model folder "
                             "(release layout)")
        if args.speech_encoder:
            raise TrainError("stage 2 takes the semantic encoder from --init: its projector was "
                             "trained on it")
        try:  # an explicit --llm (e.g. the same one from another path) must fit the projector
            model = AZeroS.from_stage1(init, args.paraling_encoder, llm_path=args.llm,
                                       gguf_file=args.gguf_file, device=device, dtype=dtype)
        except checks.CheckError as e:  # a stage-1 projector that does not fit --llm
            raise TrainError(str(e)) from None
    model.set_stage(args.stage)
    check_frozen(model, args.stage)
    return model


def trainable_names(model, stage: int | str) -> list[str]:
    return [n for n in TRAINED[stage] if getattr(model, n, None) is not None]


def check_frozen(model, stage: int | str):
    """Exactly the projector(s) of this stage may require gradients: anything else would silently train
    (and, for the LLM, cost an optimizer state the size of the model)."""
    allowed = {id(p) for n in trainable_names(model, stage) for p in getattr(model, n).parameters()}
    wrong = [n for n, p in model.named_parameters() if p.requires_grad != (id(p) in allowed)]
    if wrong:
        raise TrainError(f"stage {stage}: wrong requires_grad on {wrong[:5]} ({len(wrong)} parameters)")


class TrainedPart(nn.Module):
    """What DistributedDataParallel wraps: the projector(s) being trained, and nothing else.

    DDP broadcasts every registered parameter at start-up and hooks each one for the gradient all-reduce.
    Wrapping the whole model would broadcast the frozen 7B LLM (15 GB) for nothing and hook parameters that
    never get a gradient. So the trained projectors are registered as submodules here, while the full model
    is stored as a plain attribute (object.__setattr__ bypasses nn.Module's registration): DDP sees only the
    projector parameters, yet `forward` runs the whole model, so DDP's hooks fire when the projector
    gradients are ready, overlapping the all-reduce with the rest of the backward pass. The projector
    objects are shared with the model, so nothing is copied and `model.save_pretrained` is unaffected."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.trained = nn.ModuleDict({n: getattr(model, n) for n in names})
        object.__setattr__(self, "model", model)

    def forward(self, **kwargs):
        return self.model(**kwargs)


# ---------------------------------------------------------------------------------------------------
# 5. Learning-rate schedule
# ---------------------------------------------------------------------------------------------------


def eden2(step: int, lr: float, lr_batches: float = 7500, warmup: float = 500) -> float:
    """The official schedule (Auden's Eden2, which the recipe's `eden` config builds for an infinite
    dataset): a slow inverse-square-root-like decay, lr/sqrt(2) at step lr_batches, times a warm-up that
    rises linearly from 1/2 to 1 over the first `warmup` steps. `step` counts optimizer updates from 1,
    as the official trainer does (it sets the rate for batch b before the b-th update)."""
    warm = 0.5 + 0.5 * step / warmup if step < warmup else 1.0
    return lr * (1 + (step / lr_batches) ** 2) ** -0.5 * warm


def lr_factor(step: int, warmup: int, decay_steps: int, min_ratio: float) -> float:
    """`--schedule linear`, multiplier of --lr for optimizer step `step` (0-based) (the demo's short runs):

        lr
        |     /\\
        |    /   \\___
        |   /        \\___
        |  /             \\___ min_lr, then flat
        +--warmup--------decay_steps---> step

    Warm-up from ~0 avoids big early updates while Adam's second moments are not calibrated; the linear
    decay anneals a run of a few hundred steps, which Eden2 (tuned for 10^5 steps) would hardly decay.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup) / max(1, decay_steps - warmup)
    return 1.0 - progress * (1.0 - min_ratio)


def learning_rate(step: int, args, decay_steps: int) -> float:
    """Learning rate of optimizer update number `step` (1-based)."""
    if args.schedule == "eden2":
        return eden2(step, args.lr, args.lr_batches, args.warmup_steps)
    return args.lr * lr_factor(step - 1, args.warmup_steps, decay_steps, args.min_lr / args.lr)


# ---------------------------------------------------------------------------------------------------
# 6. SpecAugment on fbank (Park et al. 2019), Lhotse's rule as the official recipe configures it
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SpecAugment:
    """Lhotse's SpecAugment with the official recipe's settings. Per utterance, on its own frames:

    - time warp (probability p): a random centre frame c (at least `time_warp` frames from either end) moves
      to w, up to `time_warp` frames away; both sides are resized with bicubic interpolation. Clips of
      at most 2 * time_warp + 1 frames (1.6 s) are not warped.
    - masks (a second, independent draw with probability p), filled with the utterance's mean:
      `freq_masks` bands of 0..freq_width-1 bins, and n = min(time_masks, ceil(M / time_width)) spans of
      0..min(time_width, M // n) - 1 frames, where M = max_time_fraction * frames, so the spans cannot
      add up to more than 15% of the utterance.

    The encoders are frozen, so this only regularises the projectors: they see slightly damaged encoder
    outputs and must still produce the target."""
    time_warp: int = 80
    freq_masks: int = 2
    freq_width: int = 27
    time_masks: int = 10
    time_width: int = 100
    max_time_fraction: float = 0.15
    p: float = 0.9

    def __call__(self, feats: torch.Tensor, feat_lens: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(B, T, F) fbank -> augmented copy; padding frames are left alone. All random numbers come from
        `gen` (a CPU generator), so a resumed run draws the same augmentation."""
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
        left = F.interpolate(img[:, :, :centre], size=(moved, x.shape[1]), mode="bicubic", align_corners=False)
        right = F.interpolate(img[:, :, centre:], size=(T - moved, x.shape[1]), mode="bicubic", align_corners=False)
        return torch.cat([left, right], dim=2)[0, 0]

    def mask(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x, fill = x.clone(), x.mean()
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


# ---------------------------------------------------------------------------------------------------
# 7. Encoder cache (optional)
# ---------------------------------------------------------------------------------------------------


def unpad(out: torch.Tensor, lens: torch.Tensor) -> list[torch.Tensor]:
    return [out[i, : int(n)] for i, n in enumerate(lens)]


def pad(frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-utterance (T_i, D) frames -> zero-padded (B, max T_i, D) and lengths. Both the cached and the
    uncached path go through unpad -> pad, so the projector sees identical tensors either way."""
    lens = torch.tensor([len(f) for f in frames], dtype=torch.long, device=frames[0].device)
    out = frames[0].new_zeros(len(frames), int(lens.max()), frames[0].shape[-1])
    for i, f in enumerate(frames):
        out[i, : len(f)] = f
    return out, lens


def encoder_fingerprint(module: nn.Module) -> str:
    """A short hash of an encoder's weights: a cache made with other encoder weights must not be reused."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class EncoderCache:
    """Frozen encoder outputs on disk, so later epochs skip the encoders.

    Both encoders are frozen and deterministic, so an utterance's encoder output never changes: computing
    it once per run instead of once per epoch saves the encoder forward (the larger part of a step for
    small LLMs). Outputs are stored per utterance, unpadded, in safetensors shards
    `<dir>/<rank>-<n>.safetensors` with keys "<branch>/<record id>/<hash of audio path and offset>" (the hash
    keeps two manifests that reuse an id for different audio apart; the same audio listed in several
    manifests, e.g. sift_s and sift_sp targets of one corpus, shares its entry). `meta.json` holds a
    fingerprint of each encoder's weights; a cache made with different encoders is refused.

    Each rank writes its own shards (no file is shared between writers); `refresh()` at every epoch end
    re-reads the folder so a rank also finds what other ranks encoded. Reads are lazy (safe_open), so the
    cache may be larger than memory.
    """

    def __init__(self, folder, fingerprints: dict[str, str], rank: int, flush_every: int = 256):
        self.folder, self.rank, self.flush_every = Path(folder), rank, flush_every
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path = self.folder / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        for branch, fp in fingerprints.items():
            if meta.get(branch, fp) != fp:
                raise TrainError(f"--cache-encoders {self.folder} holds {branch} outputs of different encoder "
                                 "weights or precision; use a new folder (or delete this one)")
        barrier()  # every rank has checked the old meta before rank 0 rewrites it
        if rank == 0:
            write_atomic(meta_path, [json.dumps({**meta, **fingerprints}, indent=1)])
        self.pending: dict[str, torch.Tensor] = {}
        self.refresh()

    @staticmethod
    def key(branch: str, record) -> str:
        where = hashlib.sha1(f"{record.audio}|{record.offset}".encode()).hexdigest()[:8]
        return f"{branch}/{record.id}/{where}"

    def refresh(self):
        self.flush()
        barrier()  # all ranks' shards of this epoch are on disk before anyone re-reads the folder
        self.index, self.handles = {}, {}
        for shard in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                self.index.update(dict.fromkeys(f.keys(), shard))

    def get(self, records, branches: list[str], device) -> dict | None:
        """{branch: [frames per record]} when every output is cached, else None."""
        keys = {b: [self.key(b, r) for r in records] for b in branches}
        if not all(k in self.index or k in self.pending for ks in keys.values() for k in ks):
            return None
        return {b: [self._load(k).to(device) for k in ks] for b, ks in keys.items()}

    def _load(self, key: str) -> torch.Tensor:
        if key in self.pending:
            return self.pending[key]
        shard = self.index[key]
        if shard not in self.handles:
            self.handles[shard] = safe_open(str(shard), "pt")
        return self.handles[shard].get_tensor(key)

    def put(self, records, frames: dict[str, list[torch.Tensor]]):
        for branch, per_utt in frames.items():
            for r, f in zip(records, per_utt):
                self.pending[self.key(branch, r)] = f.detach().cpu().contiguous()
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        n = len(list(self.folder.glob(f"{self.rank:03d}-*.safetensors")))
        path = self.folder / f"{self.rank:03d}-{n:06d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(self.pending, str(tmp))
        os.replace(tmp, path)  # readers never see half a shard
        self.index.update(dict.fromkeys(self.pending, path))
        self.pending = {}


# ---------------------------------------------------------------------------------------------------
# 8. Checkpoints: atomic, rotating, everything needed to continue exactly
# ---------------------------------------------------------------------------------------------------


class WeightAverage:
    """A running uniform average of the trained weights, as the official trainer keeps it
    (use_averaged_model, average_period; icefall's update_averaged_model).

    Every `period` steps, at step s: avg = avg * (1 - period/s) + weights * (period/s). After the updates at
    steps period, 2 period, ..., k period, avg is the plain mean of those k snapshots: late-training noise
    averages out. Kept in float64 (a mean of thousands of snapshots must not lose their small differences),
    stored in every checkpoint and restored on resume, so a resumed run averages exactly like an
    uninterrupted one. Only the projectors being trained are averaged: everything else is frozen, and the
    mean of a constant is the constant."""

    def __init__(self, model, names: list[str], period: int):
        self.period, self.updates = period, 0
        self.params = {f"{n}.{k}": p for n in names for k, p in getattr(model, n).named_parameters()}
        self.avg = {k: p.detach().double().cpu().clone() for k, p in self.params.items()}

    def update(self, step: int):
        if self.period <= 0 or step % self.period != 0:
            return
        w = self.period / step
        for k, p in self.params.items():
            # weights * w is rounded to the parameters' float32 before the float64 sum, as in the official code
            self.avg[k].mul_(1 - w).add_(p.detach().cpu() * w)
        self.updates += 1

    def copy_to(self, model) -> str:
        """Load the average into the model (for export); a sentence saying which weights it now holds."""
        if self.updates == 0:
            return "last weights: no average yet" if self.period > 0 else "last weights: averaging off"
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.avg[k])
        return f"uniform average of {self.updates} snapshots, one every {self.period} steps"

    def state_dict(self) -> dict:
        return {"period": self.period, "updates": self.updates, "weights": self.avg}

    def load_state_dict(self, state: dict):
        if state["period"] != self.period:
            raise TrainError(f"the checkpoint averaged every {state['period']} steps, this run "
                             f"--average-period {self.period}: use the same period to resume")
        self.updates, self.avg = state["updates"], {k: v.clone() for k, v in state["weights"].items()}


def rng_state(specaug_gen: torch.Generator) -> dict:
    """Every random stream of this process. weights_only loading accepts tensors and plain Python values, so
    numpy's state array travels as a tensor."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                    *[float(x) for x in np_state[2:]]],
             "torch": torch.get_rng_state(), "specaug": specaug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, specaug_gen: torch.Generator):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    torch.set_rng_state(state["torch"])
    specaug_gen.set_state(state["specaug"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_objects(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(exp: Path, state: dict, keep_last: int, rank: int):
    """Write checkpoints/step-XXXXXXXX.pt atomically (temp file + os.replace: a crash mid-write leaves the
    previous checkpoint intact and never a truncated file that --resume would pick up), then delete all
    but the newest `keep_last`."""
    if rank != 0:
        return
    folder = exp / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{state['step']:08d}.pt"
    tmp = folder / f".{path.name}.tmp"
    with checks.cleaned_up(tmp, f"could not write the checkpoint {path}"):  # disk full: one line
        torch.save(state, tmp)
        os.replace(tmp, path)
    for old in sorted(folder.glob("step-*.pt"))[:-keep_last]:
        old.unlink()


def load_checkpoint(exp: Path, resume: str, stage, rank: int) -> tuple[Path | None, dict | None]:
    """The checkpoint --resume asks for, loaded. `latest` falls back to the newest READABLE one: a
    file damaged after it was written (a full disk, a cut copy) costs some steps, not the run."""
    candidates = [find_checkpoint(exp, resume)] if resume != "latest" else \
        sorted((exp / "checkpoints").glob("step-*.pt"), reverse=True)
    for path in candidates:
        if path is None:
            break
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, bad pickle: torch raises several types
            if resume != "latest":
                raise TrainError(f"--resume {path}: unreadable checkpoint "
                                 f"({checks.first_line(e)})") from None
            if rank == 0:
                print(f"note: {path} is unreadable ({checks.first_line(e)}); "
                      "trying the checkpoint before it")
            continue
        checks.checkpoint_stage(ckpt, path, stage)
        return path, ckpt
    return None, None


def find_checkpoint(exp: Path, resume: str) -> Path | None:
    if resume != "latest":
        if not Path(resume).exists():
            raise TrainError(f"--resume {resume}: no such checkpoint")
        return Path(resume)
    found = sorted((exp / "checkpoints").glob("step-*.pt"))
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------
# 9. One batch: features, encoders (or cache), the model
# ---------------------------------------------------------------------------------------------------


def resolve_precision(precision: str, device) -> str:
    """`auto` is bf16 on CUDA and fp32 on CPU: many CPUs have no bf16 arithmetic (it is emulated and slow),
    and the tests want exactness. Recent server CPUs (AVX512-BF16, AMX) run bf16 2-3x faster: ask for it."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device, precision: str):
    """bf16 autocast: matmuls in bf16, reductions and the loss in fp32; bf16 has fp32's exponent range, so no
    loss scaling is needed. The projectors' master weights stay fp32 either way."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def encoder_outputs(model, batch, device, cache: EncoderCache | None, specaug_gen: torch.Generator | None,
                    precision: str = "fp32"):
    """Frozen encoder outputs of a batch, {branch: (frames (B, T, D), lens)}: from the cache when every
    utterance is in it, else the front end (fbank, or log-mel for Whisper; on the training device)
    -> encoders (no_grad, eval, inside model.encode)."""
    records = batch["records"]
    branches = ["speech"] + (["paraling"] if model.use_paraling else [])
    per_utt = cache.get(records, branches, device) if cache is not None else None
    if per_utt is None:
        feats, feat_lens = model.front_end(batch["waves"], batch["wave_lens"], device=device)
        if specaug_gen is not None and isinstance(feats, dict):  # Whisper + Zipformer front ends
            feats = {b: SPEC_AUGMENT(f, feat_lens[b], specaug_gen) for b, f in feats.items()}
        elif specaug_gen is not None:
            feats = SPEC_AUGMENT(feats, feat_lens, specaug_gen)
        with autocast(device, precision):
            out = model.encode(feats, feat_lens)
        per_utt = {b: unpad(*out[b]) for b in branches}
        if cache is not None:
            cache.put(records, per_utt)
    return {b: pad(per_utt[b]) for b in branches}


def oom_message(batch, args) -> str:
    lens = batch["wave_lens"].float() / SAMPLE_RATE
    return (f"out of memory on a batch of {len(lens)} utterances, {lens.sum():.1f} s of audio (longest "
            f"{lens.max():.1f} s, padded {lens.max() * len(lens):.1f} s). Lower --max-duration (now "
            f"{args.max_duration:g}) or --max-batch (now {args.max_batch}); --grad-accum keeps the effective "
            "batch size.")


def run_batch(model, net, batch, args, device, cache, specaug_gen, train: bool) -> dict:
    """Forward (and backward when training) on one micro-batch -> the numbers the log needs."""
    try:
        enc = encoder_outputs(model, batch, device, cache, specaug_gen if train else None, args.precision)
        messages = [model.training_messages(r) for r in batch["records"]]
        with autocast(device, args.precision):
            out = net(messages=messages, encoder_outputs=enc, max_length=args.max_length or None)
        if train:
            checks.batch_tokens(float(out["num_tokens"]), batch["records"], args.max_length)
            # Divide by the number of micro-batches so the accumulated gradient is their mean, as if the
            # whole effective batch had been one forward pass.
            (out["loss"] / args.grad_accum).backward()
    except torch.OutOfMemoryError as e:
        raise TrainError(oom_message(batch, args)) from e
    except ValueError as e:
        checks.max_length_cut(e, args.max_length)  # one line when --max-length cut into the audio
        raise
    ntok, loss = float(out["num_tokens"]), float(out["loss"].detach())
    wave_lens = batch["wave_lens"]
    return {"loss_sum": loss * ntok, "acc_sum": float(out["acc"]) * ntok, "tokens": ntok,
            "samples": float(len(wave_lens)), "audio_s": float(wave_lens.sum()) / SAMPLE_RATE,
            "pad_eff_sum": padding_efficiency((wave_lens.float() / SAMPLE_RATE).tolist()) * len(wave_lens)}


@torch.no_grad()
def validate(model, loaders, args, device, cache) -> dict:
    """Token-weighted loss and accuracy over the validation manifests, summed over all ranks."""
    totals = [0.0, 0.0, 0.0]
    for loader, sampler in loaders:
        sampler.set_epoch(0)
        for batch in loader:
            m = run_batch(model, model, batch, args, device, cache, None, train=False)
            totals = [totals[0] + m["loss_sum"], totals[1] + m["acc_sum"], totals[2] + m["tokens"]]
    loss_sum, acc_sum, tokens = all_reduce_sum(totals, device)
    return {"valid_loss": loss_sum / max(tokens, 1), "valid_acc": acc_sum / max(tokens, 1), "valid_tokens": tokens}


# ---------------------------------------------------------------------------------------------------
# 10. The training loop
# ---------------------------------------------------------------------------------------------------


def batches_forever(loader, sampler, epoch: int, on_epoch_end):
    """Yield (epoch, batches consumed in that epoch, batch) across epochs, starting from the sampler's
    (possibly resumed) position. We count consumed batches ourselves: with workers, the sampler's own
    counter runs ahead of training by the prefetch depth."""
    while True:
        sampler.set_epoch(epoch)  # keeps a resumed position inside this epoch
        done = sampler.batches_done
        for batch in loader:
            done += 1
            yield epoch, done, batch
        on_epoch_end(epoch)
        epoch += 1


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.spec_augment and args.cache_encoders:
        # Cached outputs are those of unaugmented features; SpecAugment draws new masks at every step, so a
        # cache would either be wrong or never hit. Refused rather than silently bypassed.
        raise TrainError("--cache-encoders stores encoder outputs of unaugmented fbank, but SpecAugment (on by "
                         "default) changes the fbank at every step: add --no-spec-augment to use the cache")
    rank, world, device = setup_distributed(args.device)
    args.precision = resolve_precision(args.precision, device)
    exp = Path(args.exp)
    if rank == 0:
        exp.mkdir(parents=True, exist_ok=True)
    # The same seed on every rank: the projector starts identical everywhere (DDP also broadcasts rank 0's
    # weights, but identical construction keeps single- and multi-process runs comparable). SpecAugment
    # gets its own per-rank stream so ranks do not mask their different utterances identically.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    specaug_gen = torch.Generator().manual_seed(args.seed + 1000 + rank)

    # -- data ------------------------------------------------------------------------------------
    specs = [parse_train_spec(s) for s in args.train]
    train_manifests = load_manifests([p for p, _ in specs], "training", args.max_audio_seconds)
    loader, sampler = make_loader(train_manifests, [w for _, w in specs], args, rank, world, shuffle=True)
    valid_loaders = [make_loader(load_manifests([v], "validation", args.max_audio_seconds), None,
                                 args, rank, world, shuffle=False)
                     for v in args.valid]
    steps_per_epoch = len(sampler) // args.grad_accum
    if steps_per_epoch == 0 and args.max_steps is None:
        raise TrainError(f"an epoch has {len(sampler)} batches per rank, fewer than --grad-accum {args.grad_accum}")
    total_steps = args.max_steps if args.max_steps is not None else math.ceil(args.epochs * steps_per_epoch)
    decay_steps = args.decay_steps or total_steps

    # -- model, optimizer, schedule ----------------------------------------------------------------
    model = build_model(args, device)
    model.eval()  # frozen LLM and encoders: no dropout, fixed norms. (The projectors have no dropout either.)
    names = trainable_names(model, args.stage)
    params = [p for n in names for p in getattr(model, n).parameters()]
    net = TrainedPart(model, names)
    if world > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    # Adam (the official optimizer) over the projector parameters only: its state is 2x the projector, not
    # 2x the LLM. The learning rate is set before every update from the step count (learning_rate), so it
    # needs no scheduler state.
    optimizer = torch.optim.Adam(params, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay,
                                 fused=device.type == "cuda")
    average = WeightAverage(model, names, args.average_period)
    cache = None
    if args.cache_encoders:
        fps = {"speech": encoder_fingerprint(model.speech_encoder)}
        if model.use_paraling:
            fps["paraling"] = encoder_fingerprint(model.paraling_encoder)
        keys = {k: f"{v}-{device.type}-{args.precision}" for k, v in fps.items()}  # bf16 frames differ
        cache = EncoderCache(args.cache_encoders, keys, rank)

    # -- resume --------------------------------------------------------------------------------------
    step, epoch = 0, 0
    ckpt_path, ckpt = (load_checkpoint(exp, args.resume, args.stage, rank) if args.resume
                       else (None, None))
    if ckpt_path is not None:
        for n in names:
            getattr(model, n).load_state_dict(ckpt["projectors"][n])
        optimizer.load_state_dict(ckpt["optimizer"])
        if "average" not in ckpt:
            raise TrainError(f"{ckpt_path} was written by an older train.py (no weight average): start afresh")
        average.load_state_dict(ckpt["average"])
        sampler.load_state_dict(ckpt["sampler"])
        step, epoch = ckpt["step"], ckpt["sampler"]["epoch"]
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank], specaug_gen)
        elif rank == 0:
            print(f"note: checkpoint written by {len(ckpt['rng'])} ranks, now {world}: random streams restart")
        if rank == 0:
            print(f"resumed from {ckpt_path} at step {step}")
    elif args.resume and rank == 0:
        print(f"--resume: no checkpoint in {exp / 'checkpoints'}, starting from scratch")
    elif rank == 0 and list((exp / "checkpoints").glob("step-*.pt")):
        print(f"warning: {exp / 'checkpoints'} has checkpoints but --resume was not given: starting from scratch, "
              "they will be replaced")

    # -- loop ---------------------------------------------------------------------------------------
    log_path = exp / "metrics.jsonl"
    if rank == 0:
        checks.truncate_metrics(log_path, step)  # steps after the checkpoint run (and log) again
    history = []
    batch_log = open(exp / f"batches.rank{rank}.jsonl", "a") if args.log_batches else None

    def log(record: dict):
        history.append(record)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint():
        state = {"step": step, "projectors": {n: getattr(model, n).state_dict() for n in names},
                 "optimizer": optimizer.state_dict(), "average": average.state_dict(),
                 "sampler": {"epoch": epoch, "batches_done": done}, "rng": gather_objects(rng_state(specaug_gen)),
                 "args": {k: v for k, v in vars(args).items() if k != "resume"}}
        save_checkpoint(exp, state, args.keep_last, rank)

    def on_epoch_end(_):
        if cache is not None:
            cache.refresh()

    if rank == 0:
        n_train = sum(p.numel() for p in params)
        print(f"stage {args.stage}: training {', '.join(names)} ({n_train:,} parameters) on {world} rank(s), "
              f"{device}; {len(sampler)} batches per rank and epoch; steps {step} -> {total_steps}")
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    stream = batches_forever(loader, sampler, epoch, on_epoch_end)
    window = dict.fromkeys(["loss_sum", "acc_sum", "tokens", "samples", "audio_s", "pad_eff_sum"], 0.0)
    t_window = time.time()
    done = sampler.batches_done
    for p in params:
        p.grad = None
    while step < total_steps:
        # One optimizer step = grad_accum micro-batches. Only the last one all-reduces gradients: no_sync()
        # keeps DDP from communicating after every micro-batch.
        for micro in range(args.grad_accum):
            epoch, done, batch = next(stream)
            if batch_log is not None:
                ids = [r.id for r in batch["records"]]
                batch_log.write(json.dumps({"step": step, "epoch": epoch, "ids": ids}) + "\n")
            sync = world == 1 or micro == args.grad_accum - 1
            with contextlib.nullcontext() if sync else net.no_sync():
                m = run_batch(model, net, batch, args, device, cache, specaug_gen if args.spec_augment else None,
                              train=True)
            for k in window:
                window[k] += m[k]
        if args.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        lr = learning_rate(step + 1, args, decay_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        average.update(step)
        bar.update(1)

        if step % args.log_every == 0 or step == total_steps:
            sums = dict(zip(window, all_reduce_sum(list(window.values()), device)))
            dt = max(time.time() - t_window, 1e-9)
            rec = {"step": step, "epoch": epoch, "loss": sums["loss_sum"] / max(sums["tokens"], 1),
                   "acc": sums["acc_sum"] / max(sums["tokens"], 1), "lr": lr, "grad_norm": grad_norm,
                   "samples_per_s": sums["samples"] / dt, "audio_s_per_s": sums["audio_s"] / dt,
                   "tokens_per_s": sums["tokens"] / dt, "padding_eff": sums["pad_eff_sum"] / max(sums["samples"], 1)}
            if device.type == "cuda":
                rec["cuda_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", lr=f"{lr:.2e}",
                            utt_s=f"{rec['samples_per_s']:.1f}", audio_s=f"{rec['audio_s_per_s']:.0f}",
                            tok_s=f"{rec['tokens_per_s']:.0f}", pad=f"{rec['padding_eff']:.2f}",
                            **({"mem": f"{rec['cuda_mem_gb']:.1f}G"} if "cuda_mem_gb" in rec else {}))
            window = dict.fromkeys(window, 0.0)
            t_window = time.time()
        if valid_loaders and (step % args.valid_every == 0 or step == total_steps):
            v = validate(model, valid_loaders, args, device, cache)
            log({"step": step, **v})
            if rank == 0:
                bar.write(f"step {step}: valid loss {v['valid_loss']:.4f} acc {v['valid_acc']:.3f}")
        if step % args.save_every == 0 or step == total_steps:
            checkpoint()
    bar.close()
    if batch_log is not None:
        batch_log.close()
    if cache is not None:
        cache.flush()

    # -- the end: ranks agree, export in the release layout ---------------------------------------
    # DDP keeps ranks identical by construction (same start, same averaged gradients, same optimizer);
    # checking costs one all-reduce and turns a silent divergence into an error.
    rank_diff = 0.0
    if is_distributed():
        flat = torch.cat([p.detach().reshape(-1).double() for p in params])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        rank_diff = float((hi - lo).max())
    log({"step": step, "event": "end", "world_size": world, "rank_weight_max_diff": rank_diff})
    if rank_diff != 0.0:
        raise TrainError(f"ranks ended with different projector weights (max diff {rank_diff:g})")
    # The release holds the averaged weights, as the official export does (it prefers a checkpoint's
    # model_avg); the last raw weights stay in the last checkpoint. Too short a run has no average yet.
    exported = average.copy_to(model)
    if rank == 0:
        model.save_pretrained(str(exp))
        print(f"saved the stage-{args.stage} model to {exp} ({exported})")
    barrier()
    return {"model": model, "history": history, "step": step, "exp": exp}


def cli():
    try:
        main()
    # user-fixable: one line, no traceback
    except (TrainError, checks.CheckError, ManifestError, AudioError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if is_distributed():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli()
