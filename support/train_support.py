"""Support for train.py (not the method): what makes a long run safe to stop, resume and repeat.

train.py keeps the method (which parameters train, the SIFT loss, the schedules, the loop); this
file keeps the machinery beside it, so the loop can be read top to bottom:

  1. Errors: TrainError, the flag, model-folder, frozen-parameter and manifest checks before
     training, the step count, the out-of-memory message, the non-finite loss or gradient.
  2. Distributed helpers: torchrun set-up, barriers, sums and objects gathered over ranks, the
     module DDP wraps (only the trained projectors), the end-of-run rank check, the export,
     autocast.
  3. Exact resume: the --exp lock, the run's identity, the seeds and every random stream, what a
     checkpoint holds and its restore, atomic rotating checkpoints, the checkpoint to resume
     from.
  4. The running weight average that the exported model holds (official use_averaged_model).
  5. Encoder cache: frozen encoder outputs on disk, so later epochs skip the encoders.
  6. Metrics: the gradient norm (and --grad-clip), metrics.jsonl, throughput over the log
     window, the progress bar, --log-batches.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from support import checks, files, model_support
from support.manifest import read_manifest

# --------------------------------------------------------------------------------------------------
# 1. Errors
# --------------------------------------------------------------------------------------------------


class TrainError(checks.CheckError):
    """A problem the user can fix (bad manifest, wrong model combination, out of memory). The
    command line prints its message without a traceback."""


def check_args(args) -> None:
    """Flags that contradict each other, refused before anything is loaded."""
    if args.spec_augment and args.cache_encoders:
        # Cached outputs are those of unaugmented features; SpecAugment draws new masks at every
        # step, so a cache would either be wrong or never hit. Refused, not silently bypassed.
        raise TrainError("--cache-encoders stores encoder outputs of unaugmented fbank, but "
                         "SpecAugment (on by default) changes the fbank at every step: add "
                         "--no-spec-augment to use the cache")


def check_model_args(args) -> None:
    """The folders each stage needs exist and fit together, before anything is loaded."""
    for flag, path in (("--speech-encoder", args.speech_encoder),
                       ("--paraling-encoder", args.paraling_encoder), ("--init", args.init)):
        if path and not Path(path).is_dir():
            raise TrainError(f"{flag} {path}: no such folder")
        if path and flag != "--init":
            checks.encoder_folder(path, flag)
    if args.llm and (Path(args.llm) / "config.json").is_file():
        checks.json_file(Path(args.llm) / "config.json")  # e.g. a number written as a string
    if args.stage in (1, "both"):
        if not (args.llm and args.speech_encoder):
            raise TrainError(f"stage {args.stage} needs --llm and --speech-encoder")
        return
    if not (args.init and args.paraling_encoder):
        raise TrainError("stage 2 needs --init (the stage-1 model folder) and --paraling-encoder")
    if not (Path(args.init) / "model.safetensors").exists():
        raise TrainError(f"--init {Path(args.init)}: no model.safetensors; expected a stage-1 "
                         "model folder (release layout)")
    if args.speech_encoder:
        raise TrainError("stage 2 takes the semantic encoder from --init: its projector was "
                         "trained on it")


def check_frozen(model, names: list[str], stage: int | str) -> None:
    """Exactly the projector(s) of this stage may require gradients: anything else would silently
    train (and, for the LLM, cost an optimizer state the size of the model)."""
    allowed = {id(p) for n in names for p in getattr(model, n).parameters()}
    wrong = [n for n, p in model.named_parameters() if p.requires_grad != (id(p) in allowed)]
    if wrong:
        raise TrainError(f"stage {stage}: wrong requires_grad on {wrong[:5]} "
                         f"({len(wrong)} parameters)")


def count_steps(args, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: --max-steps, else --epochs passes of grad_accum batches each."""
    if batches_per_epoch == 0:  # with --max-steps the loop would wait for a batch forever
        raise TrainError(f"an epoch has 0 batches per rank: --train {' '.join(args.train)} keeps "
                         "no utterance for every rank (a weight of 0.05 on 8 rows keeps "
                         "round(0.4) = 0); raise the weights after ':' or use fewer ranks")
    steps_per_epoch = batches_per_epoch // args.grad_accum
    if steps_per_epoch == 0 and args.max_steps is None:
        raise TrainError(f"an epoch has {batches_per_epoch} batches per rank, fewer than "
                         f"--grad-accum {args.grad_accum}")
    if args.max_steps is not None:
        return args.max_steps
    return math.ceil(args.epochs * steps_per_epoch)


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
            raise TrainError(  # one line: the command lines print the first line only
                f"{what} manifest {path}: {len(missing)} of {len(records)} rows have no "
                f"'response' (first: id {missing[0].id!r} at {missing[0].source}). SIFT trains on "
                f"targets the frozen LLM generated itself; make them first, e.g. "
                f"`python generate_targets.py --mode sift_s --model <LLM> --in {path} "
                f"--out targets.jsonl` (stage 2: --mode sift_sp), and train on the output.")
        checks.training_rows(records, path, what, max_audio_seconds)
        manifests.append(records)
    return manifests


@contextlib.contextmanager
def named_errors(seconds: torch.Tensor, args):
    """Around one micro-batch of `seconds` (B,) of audio: running out of memory, or --max-length
    cutting into the audio, ends in one line that names the batch or the flag."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise TrainError(oom_message(seconds, args)) from e
    except ValueError as e:
        checks.max_length_cut(e, args.max_length)
        raise


def oom_message(lens: torch.Tensor, args) -> str:
    return (f"out of memory on a batch of {len(lens)} utterances, {lens.sum():.1f} s of audio "
            f"(longest {lens.max():.1f} s, padded {lens.max() * len(lens):.1f} s). Lower "
            f"--max-tokens (now {args.max_tokens}), --max-duration (now {args.max_duration:g}) or "
            f"--max-batch (now {args.max_batch}); --grad-accum keeps the effective batch size.")


# --------------------------------------------------------------------------------------------------
# 1b. Tokens per row, for the --max-tokens budget

# --max-tokens by default: docs/gpu.md's estimate for Qwen2.5-7B in bf16 on an 80 GB GPU, not yet
# measured. (80 GB - 15.2 GB weights - 8 GB reserve) / 7.8 MB per token (6.6 MB of activations
# + 1.2 MB of fp32 logits, as if every position were supervised) = 7,282 tokens; 12 rows of 512
# tokens leave ~16% of that for the estimate's error.
DEFAULT_MAX_TOKENS = 12 * 512


def check_row_tokens(records, tokens: np.ndarray, max_tokens: int) -> None:
    """A row the --max-tokens budget cannot hold even alone: named (file:line), not dropped."""
    over = np.flatnonzero(tokens > max_tokens)
    if len(over):
        r = records[int(over[0])]
        raise TrainError(f"{r.source}: row {r.id!r} is {int(tokens[over[0]])} tokens in the LLM "
                         f"(prompt, audio frames and response), more than --max-tokens "
                         f"{max_tokens} ({len(over)} such row(s)); raise --max-tokens or "
                         "lower --max-length")


def check_finite(step: int, window, params, rows, exp: Path) -> None:
    """Before update `step`: its loss and gradient are finite, else the run stops here, naming the
    step and its rows. A NaN that reached Adam would spread into every weight, every later
    checkpoint and the exported model, and the run would still end with status 0 (--lr 1e6 made a
    NaN loss at step 2). Stopping before the update keeps every checkpoint finite. One host sync per
    step; under DDP the two flags are summed over ranks first, so every rank stops at this step."""
    device = params[0].device
    # this step's losses; earlier steps in the window were finite (a float, or a device tensor)
    loss = torch.as_tensor(window.sums["loss_sum"], dtype=torch.float64, device=device)
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    grad = (torch.linalg.vector_norm(torch.stack(norms)).double() if norms
            else torch.zeros((), dtype=torch.float64, device=device))
    values = torch.stack([loss, grad])
    bad = (~values.isfinite()).double()
    if is_distributed():
        dist.all_reduce(bad)
    if not any(bad.tolist()):
        return
    loss, grad = values.tolist()
    named = ", ".join(f"{r.id} ({r.source})" for r in rows[:8])
    more = f" and {len(rows) - 8} more" if len(rows) > 8 else ""
    last = find_checkpoint(exp, "latest")
    kept = f"the last checkpoint, {last}, is finite" if last else "no checkpoint was written yet"
    raise TrainError(f"step {step}: the loss is {loss / max(float(window.sums['tokens']), 1):g} "
                     f"and the gradient norm {grad:g} on rows {named}{more}; stopped before the "
                     f"update and nothing was exported ({kept}). Usual causes: --lr too high, or "
                     "audio samples far outside [-1, 1] in those rows")


# --------------------------------------------------------------------------------------------------
# 2. Distributed helpers and the device
# --------------------------------------------------------------------------------------------------


def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python train.py` is rank 0 of 1.
    NCCL is the backend for GPUs, gloo for CPUs (the test suite runs 2 CPU ranks with gloo).

    The device: --device as given, else cuda when CUDA works (checks.pick_device; the caller
    refuses a large LLM on a CPU it did not ask for). Under torchrun a rank's GPU is
    cuda:LOCAL_RANK and nothing else: `--device cuda:1` would put every rank on one GPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    kind = checks.pick_device(device_arg)
    if "LOCAL_RANK" in os.environ and kind.startswith("cuda"):
        if ":" in kind:
            raise TrainError(f"--device {kind}: under torchrun each rank uses cuda:LOCAL_RANK; "
                             "give --device cuda (or leave it out)")
        if local_rank >= torch.cuda.device_count():
            raise TrainError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA "
                             "device(s): lower --nproc_per_node")
        kind = f"cuda:{local_rank}"
    device = torch.device(kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        watch_ranks()  # another rank's error ends this one too (stop_all)
    return rank, world, device


# One rank's error must stop every rank. A rank that fails stops taking part in collectives, so the
# others wait in their next one (DDP's gradient all-reduce, inside backward) until NCCL's timeout,
# 10 minutes or more; torchrun ends them only when the failed process has exited, and across nodes
# not at all. So the failing rank posts to the process group's key-value store (torchrun's TCP
# store, reachable from every node) and exits at once; every rank polls the store from a thread,
# which runs while the main thread waits inside a collective, and exits when another rank failed.


def failure_key() -> str:
    """The store key of this run's failure: one per torchrun restart (the store outlives them)."""
    return f"azeros/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


_watch: tuple | None = None  # (thread, stop event) of this process's rank watch


def watch_ranks(interval: float = 1.0) -> None:
    """Start the thread that ends this process (status 1) once another rank posted a failure.
    It stops before the process group goes (close_distributed, and at exit for any script that
    skips that): a thread still inside a store call at exit can abort the process ("terminate
    called without an active exception"), as a CI run of the suite once did."""
    import threading

    global _watch
    store, key, me = dist.distributed_c10d._get_default_store(), failure_key(), str(dist.get_rank())
    stop = threading.Event()

    def watch():
        while not stop.wait(interval):
            try:
                failed = store.check([key]) and store.get(key).decode() != me
            except Exception:  # the store is gone: the run is over
                return
            if failed:  # that rank printed its line; this one has nothing to add
                os._exit(1)

    thread = threading.Thread(target=watch, name="rank-watch", daemon=True)
    thread.start()
    _watch = (thread, stop)
    atexit.register(stop_watch)  # also for a script that never calls close_distributed


def stop_watch() -> None:
    global _watch
    if _watch is not None:
        thread, stop = _watch
        stop.set()
        thread.join(timeout=30)
        _watch = None


def report_error(line: str) -> None:
    """train.py's `error: ...` line: on a line of its own after the progress bars; under torchrun
    every rank stops with it (stop_all)."""
    close_bars()
    if is_distributed():
        stop_all(line)
    print(line, file=sys.stderr)


def stop_all(message: str):
    """End this torchrun rank with its `message` (one line, or a traceback) and tell the other
    ranks (their watch_ranks thread ends them within a second), unless one failed first: then
    this error is only the echo of that one (e.g. gloo's "connection closed") and stays silent.
    os._exit skips destroy_process_group and exit handlers, which can wait on collectives that the
    other ranks will never join. Without torchrun the callers print and return instead."""
    rank = dist.get_rank()
    try:
        store = dist.distributed_c10d._get_default_store()
        first = store.compare_set(failure_key(), "", str(rank)).decode() == str(rank)
    except Exception:  # no store to reach: say it anyway
        first = True
    if first:
        print(f"[rank {rank}] {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def check_device(args, device) -> None:
    """No silent CPU run of a large LLM: without --device, a 7B --llm on a machine whose CUDA does
    not work stops here, in one line, before 15 GB are loaded into host memory."""
    if device.type != "cpu" or args.device:
        return
    if args.llm:
        n, flag = model_support.llm_parameters(args.llm, args.gguf_file), f"--llm {args.llm}"
    else:
        n, flag = model_support.release_llm_parameters(args.init), f"the LLM of --init {args.init}"
    try:
        checks.cpu_fallback(n, args.device, device.type, flag)
    except checks.CheckError as e:
        raise TrainError(str(e)) from None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def close_distributed() -> None:
    stop_watch()  # the watch thread ends before the store and the process group do
    if is_distributed():
        dist.destroy_process_group()


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list, device) -> list[float]:
    """Sum a few numbers (floats or 0-d tensors) over ranks (for logging and validation: every
    rank sees the global figure)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    if is_distributed():
        dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_weight_spread(params) -> float:
    """Largest difference of any weight between ranks (0.0 on one process). DDP keeps ranks
    identical by construction; checking costs one all-reduce and turns a silent divergence into an
    error."""
    if not is_distributed():
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).double() for p in params])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())


class TrainedPart(nn.Module):
    """What DistributedDataParallel wraps: the projector(s) being trained, and nothing else.

    DDP broadcasts every registered parameter at start-up and hooks each one for the gradient
    all-reduce. Wrapping the whole model would broadcast the frozen 7B LLM (15 GB) for nothing and
    hook parameters that never get a gradient. So the trained projectors are registered as
    submodules here, while the full model is stored as a plain attribute (object.__setattr__
    bypasses nn.Module's registration): DDP sees only the projector parameters, yet `forward` runs
    the whole model, so DDP's hooks fire when the projector gradients are ready, overlapping the
    all-reduce with the rest of the backward pass. The projector objects are shared with the model,
    so nothing is copied and `model.save_pretrained` is unaffected."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.trained = nn.ModuleDict({n: getattr(model, n) for n in names})
        object.__setattr__(self, "model", model)

    def forward(self, **kwargs):
        return self.model(**kwargs)


def wrap(model, names: list[str], world: int, device) -> nn.Module:
    """The module the loop calls: TrainedPart, inside DistributedDataParallel if several ranks."""
    net = TrainedPart(model, names)
    if world > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def export(model, exp: Path, step: int) -> None:
    """model.save_pretrained into --exp (rank 0). A full disk is one line: the release is written
    whole or without config.json (model.save_pretrained), and the checkpoints stay for a rerun."""
    try:
        model.save_pretrained(str(exp))
    except OSError as e:
        raise TrainError(f"could not export the model to {exp} ({e}); nothing half-written is "
                         f"left and the step-{step} checkpoint is kept: free some space and run "
                         "again with --resume") from None


def check_ranks_agree(params, log, step: int, world: int) -> None:
    """DDP keeps ranks identical by construction: check it once at the end, and log it."""
    spread = rank_weight_spread(params)
    log({"step": step, "event": "end", "world_size": world, "rank_weight_max_diff": spread})
    if spread != 0.0:
        raise TrainError(f"ranks ended with different projector weights (max diff {spread:g})")


def resolve_precision(precision: str, device) -> str:
    """`auto` is bf16 on CUDA and fp32 on CPU: many CPUs have no bf16 arithmetic (it is emulated and
    slow), and the tests want exactness. Recent server CPUs (AVX512-BF16, AMX) run bf16 2-3x faster:
    ask for it."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device, precision: str):
    """bf16 autocast: matmuls in bf16, reductions and the loss in fp32; bf16 has fp32's exponent
    range, so no loss scaling is needed. The projectors' master weights stay fp32 either way."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# 3. Exact resume: random streams and checkpoints
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exp_lock(args):
    """--exp belongs to this run alone while it trains, and is known to be writable before the first
    step (a file, or a read-only folder, used to fail with a traceback after it). Two trainings
    into one --exp interleaved their metrics and checkpoints: the second now stops at once, naming
    the first (checks.exclusive_lock, as generate_targets). Under the lock, what an earlier run
    killed mid-write left behind (`.*.tmp`) is removed, and --overwrite clears the old run's
    checkpoints, which rotation would otherwise keep in place of the new run's (they sort after
    them). SIGTERM during the run ends it through `finally`, so no temporary file is left."""
    exp = Path(args.exp)
    if exp.exists() and not exp.is_dir():
        raise TrainError(f"--exp {exp} is a file, not a folder: choose another --exp")
    if args.overwrite and args.resume:
        raise TrainError("--overwrite starts a new run, --resume continues the old one: give one")
    if int(os.environ.get("RANK", 0)) != 0:  # one lock per run, held by rank 0
        with files.sigterm_exits():
            yield
        return
    try:
        exp.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=exp).close()  # a read-only folder fails here
    except OSError as e:
        raise TrainError(f"--exp {exp}: cannot write there ({e.strerror or e}); choose another "
                         "--exp") from None
    with checks.exclusive_lock(exp / "train", name=f"--exp {exp}", flag="--exp"), \
            files.sigterm_exits():
        removed = files.remove_temporary(exp) + files.remove_temporary(exp / "checkpoints")
        if removed:
            print(f"note: removed {removed} temporary file(s) left in {exp} by a killed run")
        old = sorted((exp / "checkpoints").glob("step-*.pt"))
        if old and args.overwrite:
            for path in old:
                path.unlink()
            print(f"--overwrite: removed the {len(old)} checkpoint(s) of the previous run")
        elif old and not args.resume:
            raise TrainError(f"--exp {exp} holds checkpoints of an unfinished run "
                             f"({old[-1].name}); pass --resume to continue it, --overwrite to "
                             "start afresh, or choose another --exp")
        yield


# Flags that change what a run computes (not how fast, or for how long: --max-steps and --epochs
# may grow on a resume). A resumed run with other values would be a different run.
RESULT_FLAGS = ("stage", "seed", "lr", "schedule", "lr_batches", "warmup_steps", "min_lr",
                "decay_steps", "weight_decay", "betas", "grad_clip", "average_period",
                "grad_accum", "max_duration", "max_batch", "num_buckets", "max_length",
                "spec_augment", "precision")


def run_identity(args, specs, model, names: list[str]) -> dict:
    """What makes this run this run: the flags that change its result, each training manifest's
    content (sha256) and weight, and the frozen weights (LLM, encoders, a stage-1 projector).
    Written to <exp>/run.json and into every checkpoint; --resume compares (`same_run`)."""
    return {"flags": {k: list(v) if isinstance(v, tuple) else v
                      for k, v in vars(args).items() if k in RESULT_FLAGS},
            "train": [{"path": str(path), "weight": weight, "sha256": file_sha256(path)}
                      for path, weight in specs],
            "frozen": {"llm": args.llm or f"{args.init}/llm", "speech_encoder": args.speech_encoder,
                       "paraling_encoder": args.paraling_encoder, "init": args.init,
                       "fingerprint": frozen_fingerprint(model, names)}}


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def frozen_fingerprint(model, names: list[str], samples: int = 4096) -> str:
    """A hash of every frozen tensor's name, shape and `samples` evenly spaced values: another LLM
    of the same size (a fine-tune, another seed) differs in nearly every value, and sampling keeps
    this at milliseconds for a 7B model, where hashing 15 GB would take a minute."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name.split(".")[0] in names:
            continue
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(flat[:: max(1, flat.numel() // samples)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def run_differences(old: dict, new: dict) -> list[str]:
    """What differs between two run identities, in words (empty: the same run)."""
    diffs = [f"--{k.replace('_', '-')} {new['flags'].get(k)} (was {v})"
             for k, v in old["flags"].items() if new["flags"].get(k) != v]
    if [(t["weight"], t["sha256"]) for t in old["train"]] != \
            [(t["weight"], t["sha256"]) for t in new["train"]]:
        diffs.append("the --train manifests' contents or weights")
    if old["frozen"]["fingerprint"] != new["frozen"]["fingerprint"]:
        diffs.append(f"the frozen weights (LLM, encoders; was --llm {old['frozen']['llm']})")
    return diffs


def seed_everything(seed: int, rank: int) -> torch.Generator:
    """The same seed on every rank: the projectors start identical everywhere (DDP also broadcasts
    rank 0's weights, but identical construction keeps single- and multi-process runs comparable).
    SpecAugment gets its own per-rank stream (returned) so ranks do not mask their different
    utterances identically."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 1000 + rank)


def checkpoint_state(step: int, model, names: list[str], optimizer, average, epoch: int,
                     batches_done: int, specaug_gen: torch.Generator, args) -> dict:
    """What exact resume needs: the weights, Adam's moments, the average, the sampler position
    and every random stream of every rank (a collective: every rank calls it)."""
    return {"step": step, "projectors": {n: getattr(model, n).state_dict() for n in names},
            "optimizer": optimizer.state_dict(), "average": average.state_dict(),
            "sampler": {"epoch": epoch, "batches_done": batches_done},
            "rng": gather_objects(rng_state(specaug_gen)),
            "args": {k: v for k, v in vars(args).items() if k != "resume"}}


def restore(ckpt: dict, model, names: list[str], optimizer, average, sampler,
            args) -> tuple[int, int]:
    """Load a checkpoint_state into the run; returns (step, epoch) to continue from."""
    checks.checkpoint_shapes(ckpt, model, names)  # e.g. another LLM's width: one line
    same_run(ckpt, args)  # e.g. another LLM of the same width, another manifest
    for n in names:
        getattr(model, n).load_state_dict(ckpt["projectors"][n])
    optimizer.load_state_dict(ckpt["optimizer"])
    average.load_state_dict(ckpt["average"])
    sampler.load_state_dict(ckpt["sampler"])  # the position inside the epoch
    return ckpt["step"], ckpt["sampler"]["epoch"]


def rng_state(specaug_gen: torch.Generator) -> dict:
    """Every random stream of this process. weights_only loading accepts tensors and plain Python
    values, so numpy's state array travels as a tensor."""
    np_state = np.random.get_state()
    numpy = [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
             *[float(x) for x in np_state[2:]]]
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state(),
             "specaug": specaug_gen.get_state()}
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


def save_checkpoint(exp: Path, state: dict, keep_last: int, rank: int):
    """Write checkpoints/step-XXXXXXXX.pt atomically (files.atomic_path: a crash mid-write leaves
    the previous checkpoint intact and never a truncated file that --resume would pick up), then
    delete all but the newest `keep_last`."""
    if rank != 0:
        return
    folder = exp / "checkpoints"
    path = folder / f"step-{state['step']:08d}.pt"
    with checks.written(path, f"could not write the checkpoint {path}") as tmp:  # disk full: 1 line
        torch.save(state, tmp)
    for old in sorted(folder.glob("step-*.pt"))[:-keep_last]:
        old.unlink()


def resume(exp: Path, args, rank: int, world: int, specaug_gen: torch.Generator) -> dict | None:
    """The checkpoint --resume asks for (None: start from scratch), with this process's random
    streams already restored from it; says on rank 0 what it did."""
    path, ckpt = (load_checkpoint(exp, args.resume, args.stage, rank) if args.resume
                  else (None, None))
    if ckpt is not None:
        if "average" not in ckpt:
            raise TrainError(f"{path} was written by an older train.py (no weight average): "
                             "start afresh")
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank], specaug_gen)
        elif rank == 0:
            print(f"note: checkpoint written by {len(ckpt['rng'])} ranks, now {world}: "
                  "random streams restart")
        if rank == 0:
            print(f"resumed from {path} at step {ckpt['step']}")
            note_batching_change(ckpt["args"], args)
    elif args.resume and rank == 0:
        print(f"--resume: no checkpoint in {exp / 'checkpoints'}, starting from scratch")
    if ckpt is None:
        record_identity(args)  # a resumed run records it once restore has compared it
    return ckpt


# the flags the sampler's plan of an epoch depends on (besides the manifests)
BATCHING = ("max_tokens", "max_duration", "max_batch", "num_buckets", "max_length", "seed")


def note_batching_change(saved: dict, args) -> None:
    """Resuming with other batching flags (e.g. a lower --max-tokens after running out of memory)
    is allowed, but the rest of the interrupted epoch then comes from a new plan: the position
    saved counts batches of the old one, so some utterances of that epoch may run twice or not
    at all. Say so rather than let the exact-resume promise break silently."""
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(args, k)}" for k in BATCHING
               if k in saved and saved[k] != getattr(args, k)]
    if changed:
        print(f"note: batching changed since the checkpoint ({', '.join(changed)}): the rest of "
              "its epoch is planned anew, so it may repeat or skip some of that epoch's rows")


def record_identity(args) -> None:
    """<exp>/run.json: the identity of the run that the checkpoints in --exp belong to (rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        files.write_atomic(Path(args.exp) / "run.json",
                           [json.dumps(args.identity, indent=1) + "\n"])


def same_run(ckpt: dict, args) -> None:
    """--resume continues the run that wrote the checkpoint, not another one: a changed manifest,
    another LLM of the same size or another --lr continued silently. --force-resume accepts it."""
    old = ckpt["args"].get("identity")
    diffs = run_differences(old, args.identity) if old else ["no run identity (older train.py)"]
    if diffs and not args.force_resume:
        raise TrainError(f"--resume: the checkpoint of step {ckpt['step']} belongs to another "
                         f"run; changed: {'; '.join(diffs)}. Pass --force-resume to continue it "
                         "anyway, or --overwrite to start afresh")
    if diffs:
        print(f"--force-resume: continuing step {ckpt['step']} although {'; '.join(diffs)} "
              "changed")
    record_identity(args)


def load_checkpoint(exp: Path, resume: str, stage, rank: int) -> tuple[Path | None, dict | None]:
    """The checkpoint --resume asks for, loaded. `latest` falls back to the newest READABLE one: a
    file damaged after it was written (a full disk, a cut copy) costs some steps, not the run."""
    candidates = [find_checkpoint(exp, resume)] if resume != "latest" else \
        sorted((exp / "checkpoints").glob("step-*.pt"), reverse=True)
    for path in candidates:
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


# --------------------------------------------------------------------------------------------------
# 4. The weight average (the official recipe's use_averaged_model)
# --------------------------------------------------------------------------------------------------


class WeightAverage:
    """A running uniform average of the trained weights, as the official trainer keeps it
    (use_averaged_model, average_period; icefall's update_averaged_model).

    Every `period` steps, at step s: avg = avg * (1 - period/s) + weights * (period/s). After the
    updates at steps period, 2 period, ..., k period, avg is the plain mean of those k snapshots:
    late-training noise averages out. Kept in float64 (a mean of thousands of snapshots must not
    lose their small differences), stored in every checkpoint and restored on resume, so a resumed
    run averages exactly like an uninterrupted one. Only the projectors being trained are averaged:
    everything else is frozen, and the mean of a constant is the constant."""

    def __init__(self, model, names: list[str], period: int):
        self.period, self.updates = period, 0
        self.params = {f"{n}.{k}": p for n in names
                       for k, p in getattr(model, n).named_parameters()}
        self.avg = {k: p.detach().double().cpu().clone() for k, p in self.params.items()}

    def update(self, step: int):
        if self.period <= 0 or step % self.period != 0:
            return
        w = self.period / step
        for k, p in self.params.items():
            # weights * w is rounded to the parameters' float32 before the float64 sum, as the
            # official code does
            self.avg[k].mul_(1 - w).add_(p.detach().cpu() * w)
        self.updates += 1

    def copy_to(self, model) -> str:
        """Load the average into the model (for export); a sentence saying which weights it
        holds."""
        if self.updates > 0:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(self.avg[k])
        if not all(bool(p.isfinite().all()) for p in self.params.values()):  # never exported
            raise TrainError("the weights to export are not finite: nothing exported")
        if self.updates == 0:
            return ("last weights: no average yet" if self.period > 0
                    else "last weights: averaging off")
        return f"uniform average of {self.updates} snapshots, one every {self.period} steps"

    def state_dict(self) -> dict:
        return {"period": self.period, "updates": self.updates, "weights": self.avg}

    def load_state_dict(self, state: dict):
        if state["period"] != self.period:
            raise TrainError(f"the checkpoint averaged every {state['period']} steps, this run "
                             f"--average-period {self.period}: use the same period to resume")
        self.updates = state["updates"]
        self.avg = {k: v.clone() for k, v in state["weights"].items()}


# --------------------------------------------------------------------------------------------------
# 5. Encoder cache (--cache-encoders)
# --------------------------------------------------------------------------------------------------


def unpad(out: torch.Tensor, lens: torch.Tensor) -> list[torch.Tensor]:
    return [out[i, : int(n)] for i, n in enumerate(lens)]


def pad(frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-utterance (T_i, D) frames -> zero-padded (B, max T_i, D) and lengths. Both the cached and
    the uncached path go through unpad -> pad, so the projector sees identical tensors either
    way."""
    lens = torch.tensor([len(f) for f in frames], dtype=torch.long, device=frames[0].device)
    out = frames[0].new_zeros(len(frames), int(lens.max()), frames[0].shape[-1])
    for i, f in enumerate(frames):
        out[i, : len(f)] = f
    return out, lens


def encoder_fingerprint(module: nn.Module) -> str:
    """A short hash of an encoder's weights: a cache made with other encoder weights must not be
    reused."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def open_cache(folder, model, device, precision: str, rank: int) -> EncoderCache | None:
    """The encoder cache of --cache-encoders (None without it), keyed by the encoders' weights, the
    device type and the precision (bf16 frames differ from fp32 ones)."""
    if not folder:
        return None
    fps = {"speech": encoder_fingerprint(model.speech_encoder)}
    if model.use_paraling:
        fps["paraling"] = encoder_fingerprint(model.paraling_encoder)
    return EncoderCache(folder, {k: f"{v}-{device.type}-{precision}" for k, v in fps.items()}, rank)


class EncoderCache:
    """Frozen encoder outputs on disk, so later epochs skip the encoders.

    Both encoders are frozen and deterministic, so an utterance's encoder output never changes:
    computing it once per run instead of once per epoch saves the encoder forward (the larger part
    of a step for small LLMs). Outputs are stored per utterance, unpadded, in safetensors shards
    `<dir>/<rank>-<n>.safetensors` with keys "<branch>/<record id>/<hash of the segment>", where
    the segment is the audio path, offset, duration and channel plus the file's size and mtime (the
    hash keeps two manifests that reuse an id for different audio apart, and misses when a wav was
    rewritten; the same audio listed in several manifests, e.g. sift_s and sift_sp targets of one
    corpus, shares its entry).
    `meta.json` holds a fingerprint of each encoder's weights; a cache made with different encoders
    is refused.

    Each rank writes its own shards (no file is shared between writers); `refresh()` at every epoch
    end re-reads the folder so a rank also finds what other ranks encoded. Reads are lazy
    (safe_open), so the cache may be larger than memory.
    """

    def __init__(self, folder, fingerprints: dict[str, str], rank: int, flush_every: int = 256):
        self.folder, self.rank, self.flush_every = Path(folder), rank, flush_every
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path = self.folder / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        for branch, fp in fingerprints.items():
            if meta.get(branch, fp) != fp:
                raise TrainError(f"--cache-encoders {self.folder} holds {branch} outputs of "
                                 "different encoder weights or precision; use a new folder (or "
                                 "delete this one)")
        barrier()  # every rank has checked the old meta before rank 0 rewrites it
        if rank == 0:
            files.write_atomic(meta_path, [json.dumps({**meta, **fingerprints}, indent=1)])
        self.pending: dict[str, torch.Tensor] = {}
        self.stats: dict[str, str] = {}  # audio path -> "size|mtime_ns", read once
        self.refresh()

    def key(self, branch: str, record) -> str:
        """The segment (file, offset, duration, channel) and the file's size and modification time:
        a wav rewritten in place used to be answered with its old outputs. Stat once per run."""
        if record.audio not in self.stats:
            st = os.stat(record.audio)
            self.stats[record.audio] = f"{st.st_size}|{st.st_mtime_ns}"
        segment = (f"{record.audio}|{record.offset}|{record.duration}|{record.channel}|"
                   f"{self.stats[record.audio]}")
        return f"{branch}/{record.id}/{hashlib.sha1(segment.encode()).hexdigest()[:12]}"

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
        with files.atomic_path(path) as tmp:  # readers never see half a shard
            save_file(self.pending, str(tmp))
        self.index.update(dict.fromkeys(self.pending, path))
        self.pending = {}


# --------------------------------------------------------------------------------------------------
# 6. Metrics
# --------------------------------------------------------------------------------------------------


def grad_norm(params, clip: float, logged: bool) -> float | None:
    """The gradient norm the log shows (None for a step that is not logged: no GPU sync); with
    --grad-clip > 0 also clips to it, every step (official: off)."""
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    elif logged:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    else:
        return None
    return float(norm) if logged else None


def batch_metrics(out: dict, seconds: torch.Tensor, pad_eff: float) -> dict:
    """The numbers one micro-batch adds to the log window (loss and accuracy token-weighted),
    given its audio lengths `seconds` (B,), a host tensor, and its padding efficiency.

    Nothing here waits for the GPU: the token count was made on the host (num_targets), and loss
    and accuracy stay on the device, in float64, until a log step reads the window's sums (one
    sync per log line instead of three per micro-batch). float64 products and sums give the same
    bits as the Python floats they replace."""
    ntok = out["num_targets"]
    return {"loss_sum": out["loss"].detach().double() * ntok,
            "acc_sum": out["acc"].double() * ntok, "tokens": float(ntok),
            "samples": float(len(seconds)), "audio_s": float(seconds.sum()),
            "pad_eff_sum": pad_eff * len(seconds)}


class LogWindow:
    """Sums of batch_metrics since the last log line, turned into one metrics.jsonl record: loss
    and accuracy per token, throughput per second, summed over ranks."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.sums = dict.fromkeys(["loss_sum", "acc_sum", "tokens", "samples", "audio_s",
                                   "pad_eff_sum"], 0.0)
        self.start = time.time()

    def add(self, m: dict):
        for k in self.sums:
            self.sums[k] += m[k]

    def record(self, step: int, epoch: int, lr: float, grad_norm: float) -> dict:
        s = dict(zip(self.sums, all_reduce_sum(list(self.sums.values()), self.device)))
        dt = max(time.time() - self.start, 1e-9)
        tokens = max(s["tokens"], 1)
        rec = {"step": step, "epoch": epoch, "loss": s["loss_sum"] / tokens,
               "acc": s["acc_sum"] / tokens, "lr": lr, "grad_norm": grad_norm,
               "samples_per_s": s["samples"] / dt, "audio_s_per_s": s["audio_s"] / dt,
               "tokens_per_s": s["tokens"] / dt,
               "padding_eff": s["pad_eff_sum"] / max(s["samples"], 1)}
        if self.device.type == "cuda":
            rec["cuda_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.reset()
        return rec


def close_bars() -> None:
    """Before an error line: close the progress bars left open by the exception, so the error gets
    a line of its own instead of trailing the bar."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def show(bar, rec: dict):
    """The latest log record on the progress bar."""
    mem = {"mem": f"{rec['cuda_mem_gb']:.1f}G"} if "cuda_mem_gb" in rec else {}
    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", lr=f"{rec['lr']:.2e}",
                    utt_s=f"{rec['samples_per_s']:.1f}", audio_s=f"{rec['audio_s_per_s']:.0f}",
                    tok_s=f"{rec['tokens_per_s']:.0f}", pad=f"{rec['padding_eff']:.2f}", **mem)


class MetricsLog:
    """<exp>/metrics.jsonl (written by rank 0) and the run's history (returned by train.main); with
    --log-batches also the ids of every batch in <exp>/batches.rankN.jsonl.

    A resumed run starts by dropping what was logged after its checkpoint: those steps run (and
    log) again and would otherwise appear twice."""

    def __init__(self, exp: Path, rank: int, step: int, log_batches: bool):
        self.path, self.rank, self.history = exp / "metrics.jsonl", rank, []
        self.batches = exp / f"batches.rank{rank}.jsonl" if log_batches else None
        if rank == 0:  # step N's records come before its checkpoint, a finished run's end after it
            checks.truncate_log(self.path, lambda r: r.get("step", 0) < step
                                or (r.get("step") == step and "event" not in r))
        if self.batches:  # logged with the step about to run: steps N, N+1, ... run again
            checks.truncate_log(self.batches, lambda r: r["step"] < step)

    def __call__(self, record: dict):
        self.history.append(record)
        if self.rank == 0:
            files.append_jsonl(self.path, [record])

    def batch(self, step: int, epoch: int, records):
        if self.batches:
            files.append_jsonl(self.batches, [{"step": step, "epoch": epoch,
                                               "ids": [r.id for r in records]}])

