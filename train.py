"""Train the AZeroS projectors on self-generated targets (paper Sec. 3.4 SIFT, Sec. 4.2 two stages).

SIFT (Self-generated Instruction-Free Tuning) needs no human instructions: for every utterance the
frozen LLM has already answered a *text* stand-in for the audio (generate_targets.py wrote that
answer into the manifest as `response`). Here we teach the projectors to make the *audio* version of
the prompt produce the same answer. Only the projectors learn; the encoders and the LLM stay frozen.

  manifest rows (audio, response) -> duration-bucketed batches -> fbank (+ SpecAugment)
  -> frozen encoders (B, T, D) -> projectors (B, T / ds_rate, H) -> spliced in at <|AUDIO|>
  -> frozen LLM -> cross-entropy on the response tokens only -> Adam on the projectors

  stage 1  speech encoder + projector; the prompt is just `<|AUDIO|>` standing for the transcript
           (targets: `sift_s`). Trains `speech_encoder_projector`.
  stage 2  adds the paralinguistic encoder; the prompt is
           `<audio><meta><|AUDIO|></meta><text><|AUDIO|></text></audio>` (targets: `sift_sp`,
           usually mixed with `sift_s`). Loads the stage-1 model, FREEZES its projector and trains
           only `paraling_encoder_projector`, so stage 2 cannot undo what stage 1 learnt.
  both     one stage instead (paper Table 6): fresh projectors for every encoder given, trained
           together on a mix such as sift_s + sift_sp. With a Whisper folder as the only encoder
           this is the Table 6 Whisper row.

    python train.py --stage 1 --llm Qwen/Qwen2.5-7B-Instruct --speech-encoder tta/ \\
        --train sift_s.jsonl --valid dev.jsonl --exp exp/stage1
    python train.py --stage 2 --init exp/stage1 --paraling-encoder voice/ \\
        --train sift_sp.jsonl:1 sift_s.jsonl:0.5 --valid dev.jsonl --exp exp/stage2
    torchrun --nproc_per_node=8 train.py ...        # same flags, DistributedDataParallel

The defaults are the official recipe's (examples/azeros/configs/train.yaml): Adam at 1e-3 with the
Eden2 schedule, no gradient clipping, sequences cut at 512 tokens, Lhotse's SpecAugment, and a
running average of the weights every 200 steps, which is what the exported model holds. The
page docs/differences.md lists where we deliberately differ.

Read it like nanoGPT's train.py: the command line, then `run` (data, model, resume, the loop),
then what the loop calls (which parameters train, learning-rate schedules, one batch and its loss).
Support (not the method): support/train_support.py (checks before training, exact-resume
checkpoints, weight average, encoder cache, DDP helpers, metrics log), support/spec_augment.py,
support/checks.py (errors).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from pathlib import Path

# Intel MKL picks its thread count by the machine's load unless told not to; another count sums in
# another order, and two identical runs drift apart. Must be set before torch loads MKL.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from data import AudioDataset, DurationBucketSampler, collate
from support import checks, train_support
from support.spec_augment import SPEC_AUGMENT
from support.train_support import TrainError, pad, unpad

# --------------------------------------------------------------------------------------------------
# 1. Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument_group("model").add_argument
    a("--stage", type=lambda s: s if s == "both" else int(s), choices=[1, 2, "both"], required=True,
      help="1: speech projector; 2: paralinguistic; both: all at once (paper Table 6)")
    a("--llm", help="frozen LLM: HF folder, hub id or .gguf (stage 2: default the one in --init)")
    a("--gguf-file", help="GGUF file name inside --llm")
    a("--speech-encoder", help="speech encoder folder, Zipformer or Whisper (stage 2: from --init)")
    a("--paraling-encoder", help="paralinguistic Zipformer folder (stage 2; optional with both)")
    a("--init", help="stage 2: the stage-1 model folder (release layout, e.g. exp/stage1)")
    a = p.add_argument_group("data").add_argument
    a("--train", nargs="+", required=True, metavar="JSONL[:WEIGHT]",
      help="manifests with responses (generate_targets.py); WEIGHT 2: twice an epoch, 0.5: half")
    a("--valid", nargs="*", default=[], metavar="JSONL", help="validation manifests")
    a("--max-tokens", type=int, default=train_support.DEFAULT_MAX_TOKENS,
      help="padded LLM tokens per batch and rank, rows x longest row (0: no limit); the default\n"
           "fits a 7B LLM on an 80 GB GPU by docs/gpu.md's estimate")
    a("--max-duration", type=float, default=100.0, help="padded seconds of audio per batch, rank")
    a("--max-batch", type=int, default=64, help="utterances per batch at most")
    a("--num-buckets", type=int, default=30, help="duration buckets of the sampler")
    a("--max-length", type=int, default=512, help="cut token sequences here (0: no limit)")
    a("--num-workers", type=int, default=2, help="DataLoader workers reading audio")
    a("--max-audio-seconds", type=float, default=checks.MAX_AUDIO_SECONDS,
      help=checks.MAX_AUDIO_HELP)
    a("--no-spec-augment", dest="spec_augment", action="store_false",
      help="turn off SpecAugment (Lhotse's warp and masks; on by default, as official)")
    a("--cache-encoders", metavar="DIR",
      help="store frozen encoder outputs here; later epochs reuse them (needs --no-spec-augment)")
    a = p.add_argument_group("optimisation").add_argument
    a("--lr", type=float, default=1e-3, help="base learning rate of Adam (official recipe: 1e-3)")
    a("--schedule", choices=["eden2", "linear"], default="eden2",
      help="eden2 (official): lr * (1 + (step/--lr-batches)^2)^-0.5 after a warm-up from lr/2;\n"
           "linear: warm-up from 0, then linear decay to --min-lr at --decay-steps")
    a("--lr-batches", type=float, default=7500, help="eden2: step where lr is down by 1/sqrt(2)")
    a("--warmup-steps", type=int, default=500, help="warm-up length (official eden2: 500)")
    a("--min-lr", type=float, default=1e-5, help="linear: learning rate at the end of the decay")
    a("--decay-steps", type=int, help="linear: step where decay reaches --min-lr (default: last)")
    a("--weight-decay", type=float, default=0.0, help="Adam's L2 weight decay (official: 0)")
    a("--betas", type=float, nargs=2, default=(0.9, 0.999))
    a("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0: off, as official)")
    a("--average-period", type=int, default=200,
      help="every N steps fold the weights into the running average the model exports (0: off)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--grad-checkpointing", action="store_true",
      help="recompute the frozen LLM's layers in the backward pass: each keeps only its input\n"
           "(~1/30 of its activations) for ~1.5x the LLM compute (docs/gpu.md)")
    a("--max-steps", type=int, help="optimizer steps to run (overrides --epochs)")
    a("--epochs", type=float, default=1.0, help="passes over the training data")
    a("--seed", type=int, default=42)
    a = p.add_argument_group("run").add_argument
    a("--exp", required=True, help="output folder: checkpoints/, metrics.jsonl, the final model")
    a("--device", help="cuda / cpu (default: cuda when it works; a large --llm on a CPU needs\n"
                       "--device cpu). Under torchrun each rank takes cuda:LOCAL_RANK")
    a("--precision", choices=["auto", "bf16", "fp32"], default="auto",
      help="autocast (auto: bf16 on CUDA, fp32 on CPU; bf16 pays off on AVX512-BF16/AMX CPUs)")
    a("--log-every", type=int, default=10, help="steps between log lines")
    a("--valid-every", type=int, default=500, help="steps between validations (and one at the end)")
    a("--save-every", type=int, default=1000, help="steps between checkpoints (and one at the end)")
    a("--keep-last", type=int, default=3, help="checkpoints to keep")
    a("--resume", nargs="?", const="latest", metavar="CKPT",
      help="continue from CKPT, or from the newest checkpoint in <exp>/checkpoints")
    a("--log-batches", action="store_true",
      help="write the ids of every batch to <exp>/batches.rankN.jsonl")
    a("--overwrite", action="store_true", help="start a new run in --exp, replacing its model")
    a("--force-resume", action="store_true",
      help="--resume even if the data, LLM or result-changing flags differ from the checkpoint's")
    args = p.parse_args(argv)
    checks.training_args(args)  # positive budgets, a device that exists, no finished model replaced
    for spec in args.train:  # the manifest weights, with the other flags
        parse_train_spec(spec)
    return args


# --------------------------------------------------------------------------------------------------
# 2. main: set-up, then the training loop
# --------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    with train_support.exp_lock(args):  # one run per --exp, writable before the first step
        return run(args)


def run(args) -> dict:
    train_support.check_args(args)  # e.g. --cache-encoders needs --no-spec-augment
    train_support.check_model_args(args)  # the folders this stage needs exist and fit together
    rank, world, device = train_support.setup_distributed(args.device)
    train_support.check_device(args, device)  # a 7B --llm on a CPU nobody asked for: one line
    args.precision = train_support.resolve_precision(args.precision, device)
    exp = Path(args.exp)
    if rank == 0:
        exp.mkdir(parents=True, exist_ok=True)
    # one seed for all ranks (identical projectors); SpecAugment draws from a stream per rank
    specaug_gen = train_support.seed_everything(args.seed, rank)

    # -- data --------------------------------------------------------------------------------------
    specs = [parse_train_spec(s) for s in args.train]
    limit = args.max_audio_seconds
    manifests = train_support.load_manifests([p for p, _ in specs], "training", limit)
    valid = [train_support.load_manifests([v], "validation", limit) for v in args.valid]

    # -- model: everything frozen but this stage's projector(s) ------------------------------------
    model = build_model(args, device)
    # batches need each row's length in the LLM (--max-tokens), which the model's prompt decides
    loader, sampler = make_loader(model, manifests, [w for _, w in specs], args, rank, world,
                                  shuffle=True)
    valid_loaders = [make_loader(model, m, None, args, rank, world, shuffle=False) for m in valid]
    total_steps = train_support.count_steps(args, len(sampler))  # --max-steps or --epochs
    decay_steps = args.decay_steps or total_steps
    model.eval()  # frozen LLM and encoders: no dropout, fixed norms (projectors have no dropout)
    names = trainable_names(model, args.stage)
    params = [p for n in names for p in getattr(model, n).parameters()]
    net = train_support.wrap(model, names, world, device)  # DDP sees the projectors only
    # Adam (the official optimizer) over the projector parameters only: its state is 2x the
    # projector, not 2x the LLM. The learning rate is set before every update from the step count
    # (learning_rate), so it needs no scheduler state.
    optimizer = torch.optim.Adam(params, lr=args.lr, betas=tuple(args.betas),
                                 weight_decay=args.weight_decay, fused=device.type == "cuda")
    # every --average-period steps the weights join a running mean: what the export holds
    average = train_support.WeightAverage(model, names, args.average_period)
    cache = train_support.open_cache(args.cache_encoders, model, device, args.precision, rank)

    # -- resume: everything that makes step N+1 the step an uninterrupted run would take -----------
    step, epoch = 0, 0
    # the run's identity (seed, data, frozen LLM and encoders, flags): --resume must match it
    args.identity = train_support.run_identity(args, specs, model, names)
    ckpt = train_support.resume(exp, args, rank, world, specaug_gen)  # also the random streams
    if ckpt is not None:  # weights, Adam's moments, the average, the position in the epoch
        step, epoch = train_support.restore(ckpt, model, names, optimizer, average, sampler, args)

    # -- the loop ----------------------------------------------------------------------------------
    log = train_support.MetricsLog(exp, rank, step, args.log_batches)
    if rank == 0:
        n_train = sum(p.numel() for p in params)
        print(f"stage {args.stage}: training {', '.join(names)} ({n_train:,} parameters) on "
              f"{world} rank(s), {device}; {len(sampler)} batches per rank and epoch; "
              f"steps {step} -> {total_steps}")
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    stream = batches_forever(loader, sampler, epoch, cache)
    window = train_support.LogWindow(device)
    done = sampler.batches_done
    for p in params:
        p.grad = None
    while step < total_steps:
        # One optimizer step = grad_accum micro-batches. Only the last one all-reduces gradients:
        # no_sync() keeps DDP from communicating after every micro-batch.
        rows = []  # this step's utterances, named if its loss or gradient is not finite
        for micro in range(args.grad_accum):
            epoch, done, batch = next(stream)
            rows += batch["records"]
            log.batch(step, epoch, batch["records"])
            sync = world == 1 or micro == args.grad_accum - 1
            with contextlib.nullcontext() if sync else net.no_sync():
                window.add(run_batch(model, net, batch, args, device, cache,
                                     specaug_gen if args.spec_augment else None, train=True))
        train_support.check_finite(step + 1, window, params, rows, exp)  # NaN never reaches Adam
        logged = (step + 1) % args.log_every == 0 or step + 1 == total_steps
        # clips if --grad-clip > 0; the norm is read to the host only for a step that is logged
        grad_norm = train_support.grad_norm(params, args.grad_clip, logged)
        lr = learning_rate(step + 1, args, decay_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        average.update(step)
        bar.update(1)

        if logged:
            record = window.record(step, epoch, lr, grad_norm)
            log(record)
            train_support.show(bar, record)
        if valid_loaders and (step % args.valid_every == 0 or step == total_steps):
            v = validate(model, valid_loaders, args, device, cache)
            log({"step": step, **v})
            if rank == 0:
                bar.write(f"step {step}: valid loss {v['valid_loss']:.4f} acc {v['valid_acc']:.3f}")
        if step % args.save_every == 0 or step == total_steps:
            # everything exact resume needs, down to every random stream of every rank
            state = train_support.checkpoint_state(step, model, names, optimizer, average, epoch,
                                                   done, specaug_gen, args)
            train_support.save_checkpoint(exp, state, args.keep_last, rank)
    bar.close()
    if cache is not None:
        cache.flush()

    # -- the end: ranks agree, export in the release layout ----------------------------------------
    train_support.check_ranks_agree(params, log, step, world)  # DDP keeps them identical
    # The release holds the averaged weights, as the official export does (it prefers a
    # checkpoint's model_avg); the last raw weights stay in the last checkpoint. Too short a run has
    # no average yet.
    exported = average.copy_to(model)
    if rank == 0:
        train_support.export(model, exp, step)  # whole, or one line and no config.json
        print(f"saved the stage-{args.stage} model to {exp} ({exported})")
    train_support.barrier()
    return {"model": model, "history": log.history, "step": step, "exp": exp}


# --------------------------------------------------------------------------------------------------
# 3. Data
# --------------------------------------------------------------------------------------------------


def parse_train_spec(spec: str) -> tuple[str, float]:
    """'a.jsonl:2' -> ('a.jsonl', 2.0); 'a.jsonl' -> ('a.jsonl', 1.0). Only a numeric suffix is a
    weight, so paths containing ':' still work."""
    path, sep, weight = spec.rpartition(":")
    if sep:
        try:
            value = float(weight)
        except ValueError:
            return spec, 1.0
        checks.manifest_weight(spec, value)  # nan, inf, 0 or negative: one line
        return path, value
    return spec, 1.0


def make_loader(model, manifests, weights, args, rank, world, shuffle: bool):
    """DataLoader over the concatenated manifests, batched by the duration-bucketed sampler.

    The sampler decides everything (which utterances, in which batches, on which rank) from (seed,
    epoch): ranks agree without communicating, and a resumed run skips straight to its position.
    With --max-tokens it also bounds rows x longest row in the LLM, counted from the manifest.
    The loader gets its own torch.Generator, else each new iterator draws a seed from the GLOBAL
    RNG, which would make the random stream depend on when it was created (and break resume)."""
    records = [r for m in manifests for r in m]
    tokens = None
    if args.max_tokens:
        tokens = [count_row_tokens(model, m, args.max_length) for m in manifests]
        for m, t in zip(manifests, tokens):
            train_support.check_row_tokens(m, t, args.max_tokens)  # file:line of a row too long
    sampler = DurationBucketSampler([[r.duration for r in m] for m in manifests], weights=weights,
                                    max_duration=args.max_duration, max_batch=args.max_batch,
                                    num_buckets=args.num_buckets, seed=args.seed, rank=rank,
                                    world_size=world, shuffle=shuffle, tokens=tokens,
                                    max_tokens=args.max_tokens)
    loader = torch.utils.data.DataLoader(AudioDataset(records), batch_sampler=sampler,
                                         collate_fn=collate, num_workers=args.num_workers,
                                         generator=torch.Generator().manual_seed(0),
                                         pin_memory=torch.cuda.is_available())
    return loader, sampler


# Tokens per row, for the --max-tokens budget: counted from the manifest, before any batch runs


def row_tokens(model, records, max_length: int | None) -> np.ndarray:
    """Each row's length in the LLM, as run_batch will build it, from the manifest alone: the
    tokens of its training chat (the stage's prompt + the response), each `<|AUDIO|>` replaced by
    the frames its projector emits for the row's duration, cut at --max-length.

    Exact for 16 kHz audio. Audio at another rate is resampled from round(duration * rate)
    samples, which can end a sample or two away from round(duration * 16000): a row then
    counts at most one audio frame too few or too many (the budget leaves room for that)."""
    import llm  # here: `python train.py --help` does not wait for transformers

    tokenizer = model.tokenizer
    audio_id = tokenizer.convert_tokens_to_ids(llm.AUDIO_TOKEN)
    texts = [llm.chat_text(tokenizer, model.training_messages(r), training=True) for r in records]
    text = np.zeros(len(records), dtype=np.int64)
    for start in range(0, len(texts), 4096):  # the fast tokenizer encodes a list in parallel
        ids = tokenizer(texts[start:start + 4096], add_special_tokens=False)["input_ids"]
        text[start:start + len(ids)] = [len(row) - row.count(audio_id) for row in ids]
    samples = np.round(np.array([r.duration for r in records], dtype=np.float64) * data.SAMPLE_RATE)
    total = text + sum(audio_tokens(model, branch, samples.astype(np.int64))
                       for branch in model.encoders())
    return np.minimum(total, max_length) if max_length else total


def count_row_tokens(model, records, max_length: int | None) -> np.ndarray:
    """row_tokens of every row, each rank counting an equal share: all ranks need all counts (the
    same plan), and one core tokenizes only a few thousand rows a second."""
    distributed = train_support.is_distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    counts = np.zeros(len(records), dtype=np.int64)
    parts = train_support.gather_objects(row_tokens(model, records[rank::world], max_length))
    for r, part in enumerate(parts):
        counts[r::world] = part
    return counts


def audio_tokens(model, branch: str, samples: np.ndarray) -> np.ndarray:
    """LLM positions one branch's projector fills for utterances of `samples` 16 kHz samples: the
    encoder's frame count (Zipformer: fbank frames through its two stride-2 stages; Whisper: log-mel
    frames, at most 30 s, through its stride-2 convolution), divided by the projector's ds_rate."""
    encoder = getattr(model, f"{branch}_encoder")
    projector = getattr(model, f"{branch}_encoder_projector")
    if getattr(encoder, "front_end", "fbank") == "fbank":
        from zipformer import output_lengths
        frames = output_lengths(torch.from_numpy(data.num_frames(samples))).numpy()
    else:
        from whisper_encoder import HOP_LENGTH, MAX_FRAMES
        frames = (np.minimum(samples // HOP_LENGTH, MAX_FRAMES) - 1) // 2 + 1
    return np.maximum(frames, 0) // projector.ds_rate


def batches_forever(loader, sampler, epoch: int, cache):
    """Yield (epoch, batches consumed in that epoch, batch) across epochs, starting from the
    sampler's (possibly resumed) position. We count consumed batches ourselves: with workers, the
    sampler's own counter runs ahead of training by the prefetch depth."""
    while True:
        sampler.set_epoch(epoch)  # keeps a resumed position inside this epoch
        done = sampler.batches_done
        for batch in loader:
            done += 1
            yield epoch, done, batch
        if cache is not None:
            cache.refresh()  # also finds what the other ranks encoded this epoch
        epoch += 1


# --------------------------------------------------------------------------------------------------
# 4. Model: which parameters train in each stage
# --------------------------------------------------------------------------------------------------

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
    if args.stage in (1, "both"):
        paraling = args.paraling_encoder if args.stage == "both" else None
        model = AZeroS.from_components(args.llm, args.speech_encoder, paraling,
                                       gguf_file=args.gguf_file, device=device, dtype=dtype)
    else:
        try:  # an explicit --llm (e.g. the same one from another path) must fit the projector
            model = AZeroS.from_stage1(Path(args.init), args.paraling_encoder, llm_path=args.llm,
                                       gguf_file=args.gguf_file, device=device, dtype=dtype)
        except checks.CheckError as e:  # a stage-1 projector that does not fit --llm
            raise TrainError(str(e)) from None
    model.set_stage(args.stage)
    if args.grad_checkpointing:  # the frozen LLM stays in eval mode: llm.checkpoint_layers
        import llm
        llm.checkpoint_layers(model.llm)
    train_support.check_frozen(model, trainable_names(model, args.stage), args.stage)
    return model


def trainable_names(model, stage: int | str) -> list[str]:
    return [n for n in TRAINED[stage] if getattr(model, n, None) is not None]


# --------------------------------------------------------------------------------------------------
# 5. Learning-rate schedules
# --------------------------------------------------------------------------------------------------


def eden2(step: int, lr: float, lr_batches: float = 7500, warmup: float = 500) -> float:
    """The official schedule (Auden's Eden2, which the recipe's `eden` config builds for an
    infinite dataset): a slow inverse-square-root-like decay, lr/sqrt(2) at step lr_batches, times a
    warm-up that rises linearly from 1/2 to 1 over the first `warmup` steps. `step` counts optimizer
    updates from 1, as the official trainer does (it sets the rate for batch b before the b-th
    update)."""
    warm = 0.5 + 0.5 * step / warmup if step < warmup else 1.0
    return lr * (1 + (step / lr_batches) ** 2) ** -0.5 * warm


def lr_factor(step: int, warmup: int, decay_steps: int, min_ratio: float) -> float:
    """`--schedule linear`, multiplier of --lr for optimizer step `step` (0-based) (the demo's short
    runs):

        lr
        |     /\\
        |    /   \\___
        |   /        \\___
        |  /             \\___ min_lr, then flat
        +--warmup--------decay_steps---> step

    Warm-up from ~0 avoids big early updates while Adam's second moments are not calibrated; the
    linear decay anneals a run of a few hundred steps, which Eden2 (tuned for 10^5 steps) would
    hardly decay.
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


# --------------------------------------------------------------------------------------------------
# 6. One batch: features, encoders (or cache), the SIFT loss
# --------------------------------------------------------------------------------------------------


def encoder_outputs(model, batch, device, cache, specaug_gen: torch.Generator | None,
                    precision: str = "fp32"):
    """Frozen encoder outputs of a batch, {branch: (frames (B, T, D), lens)}: from the cache when
    every utterance is in it, else the front end (fbank, or log-mel for Whisper; on the training
    device) -> SpecAugment -> encoders (no_grad, eval, inside model.encode)."""
    records = batch["records"]
    branches = ["speech"] + (["paraling"] if model.use_paraling else [])
    per_utt = cache.get(records, branches, device) if cache is not None else None
    if per_utt is None:
        # once per front end: two Zipformers read one fbank, and one set of masks
        augment = None if specaug_gen is None else (
            lambda feats, lens: SPEC_AUGMENT(feats, lens, specaug_gen))
        feats = model.front_end(batch["waves"], batch["wave_lens"], device=device, augment=augment)
        with train_support.autocast(device, precision):
            out = model.encode(feats)
        per_utt = {b: unpad(*out[b]) for b in branches}  # per utterance: what the cache stores
        if cache is not None:
            cache.put(records, per_utt)
    return {b: pad(per_utt[b]) for b in branches}


def run_batch(model, net, batch, args, device, cache, specaug_gen, train: bool) -> dict:
    """Forward (and backward when training) on one micro-batch -> the numbers the log needs.

    The SIFT loss: each row is the stage's prompt with the audio in it, answered by the `response`
    the frozen LLM itself wrote for the text stand-in; the model returns the mean cross-entropy
    over the response tokens only (prompt and audio positions are not supervised)."""
    seconds = batch["wave_lens"].double() / data.SAMPLE_RATE  # (B,) audio lengths: the log's unit
    with train_support.named_errors(seconds, args):  # out of memory, --max-length: one line
        enc = encoder_outputs(model, batch, device, cache, specaug_gen if train else None,
                              args.precision)
        messages = [model.training_messages(r) for r in batch["records"]]
        with train_support.autocast(device, args.precision):
            out = net(messages=messages, encoder_outputs=enc, max_length=args.max_length or None)
        if train:
            # Divide by the number of micro-batches so the accumulated gradient is their mean, as if
            # the whole effective batch had been one forward pass.
            (out["loss"] / args.grad_accum).backward()
    # no GPU sync here (see batch_metrics): the log reads the device's sums once per log line
    metrics = train_support.batch_metrics(out, seconds, data.padding_efficiency(seconds.tolist()))
    if train:  # after backward, not before it (no GPU wait); a batch without tokens has loss 0
        checks.batch_tokens(metrics["tokens"], batch["records"], args.max_length)
    return metrics


@torch.no_grad()
def validate(model, loaders, args, device, cache) -> dict:
    """Token-weighted loss and accuracy over the validation manifests, summed over all ranks."""
    totals = [0.0, 0.0, 0.0]
    for loader, sampler in loaders:
        sampler.set_epoch(0)
        for batch in loader:
            m = run_batch(model, model, batch, args, device, cache, None, train=False)
            totals = [totals[0] + m["loss_sum"], totals[1] + m["acc_sum"], totals[2] + m["tokens"]]
    loss_sum, acc_sum, tokens = train_support.all_reduce_sum(totals, device)
    return {"valid_loss": loss_sum / max(tokens, 1), "valid_acc": acc_sum / max(tokens, 1),
            "valid_tokens": tokens}


def cli(argv=None) -> int:
    """main() under the one error path of the commands (support/checks.py), with two torchrun
    rules: on a bad input every rank stops with this rank's line, and a bug (what run_command
    re-raises) is a traceback that stops every rank too."""
    try:
        return checks.run_command(main, argv, report=train_support.report_error)
    except Exception:
        if not train_support.is_distributed():
            raise
        train_support.stop_all(traceback.format_exc().rstrip())
    finally:
        train_support.close_distributed()


if __name__ == "__main__":
    sys.exit(cli())
