"""Support code: the checks that turn bad input and faults into one clear line (not part of the method).

The tutorial files (train.py, infer.py, evaluate.py, generate_targets.py) call these with one line each,
so the reading path stays about AZeroS. Every check fails with `CheckError`, whose message is a single
line naming the file (manifest file:line and field, where there is one) and the flag that changes it.

  arguments      positive budgets, sampling ranges, devices that exist
  audio          length limits, and header-only checks of every file a manifest names (before training)
  training data  rows that give the loss something to learn
  outputs        a finished model is never replaced silently; an exclusive lock on a generation output
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from pathlib import Path

# The official data module drops cuts longer than 50 s; memory grows with the square of the length in the
# encoders' attention (BENCHMARKS.md "Audio length and memory"), so longer audio is refused, not truncated.
MAX_AUDIO_SECONDS = 50.0
# The Zipformer front end needs 9 fbank frames (90 ms) to give any output at all (zipformer.MIN_INPUT_FRAMES).
MIN_AUDIO_SECONDS = 0.09
# A manifest's offset + duration may run past the end of its file by at most one fbank frame shift (10 ms):
# durations rounded to the millisecond, or computed from another sample rate, land within it.
END_TOLERANCE_SECONDS = 0.01
MAX_AUDIO_HELP = f"refuse audio longer than this many seconds (default {MAX_AUDIO_SECONDS:g}; 0: no limit)"


class CheckError(ValueError):
    """Bad input or a fault the user can fix; the command lines print it as one line, without a traceback."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------


def positive(args, *names: str) -> None:
    """Refuse zero or negative budgets (--max-steps 0 would train nothing and still export a model)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CheckError(f"--{name.replace('_', '-')} must be positive, got {value:g}")


def sampling(args) -> None:
    """--top-p is a probability mass in (0, 1]; --temperature must be positive when given."""
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CheckError(f"--top-p must be in (0, 1], got {args.top_p:g}")
    if args.temperature is not None and args.temperature < 0:
        raise CheckError(f"--temperature must not be negative, got {args.temperature:g}")


def device(name: str | None) -> str | None:
    """A --device that this machine has (asking for cuda without CUDA fails later with a torch traceback)."""
    import torch

    if name and name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CheckError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise CheckError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return name


def training_args(args) -> None:
    """train.py's command line, before anything is loaded."""
    positive(args, "max_steps", "epochs")
    device(args.device)
    if args.stage == 1 and args.init:
        raise CheckError("--init is for stage 2 (the stage-1 model to start from); stage 1 starts from --llm and "
                         "--speech-encoder")
    finished_model(args.exp, args.overwrite, args.resume)


@contextlib.contextmanager
def readable(path):
    """Around reading an input file: a truncated .gz or an I/O error names the file, in one line."""
    try:
        yield
    except (OSError, EOFError) as e:
        raise CheckError(f"{path}: unreadable ({first_line(e)})") from None


def files_exist(paths, flag: str) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise CheckError(f"{flag} {path}: no such file")


# ---------------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------------


def audio_seconds(path) -> float:
    """Length of an audio file from its header alone (no samples are read)."""
    import soundfile as sf

    if not os.path.isfile(path):
        raise CheckError(f"{path}: audio file not found")
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile's own error types vary between versions
        raise CheckError(f"{path}: unreadable audio ({first_line(e)})") from None
    return info.frames / info.samplerate


def audio_length(path, seconds: float, limit: float | None, where: str = "") -> None:
    """Refuse audio over `limit` seconds (the encoders' memory grows with its square) or too short to encode."""
    where = where or str(path)
    if limit and seconds > limit:
        raise CheckError(f"{where}: {seconds:.1f} s of audio is over the limit of {limit:g} s (the encoders' memory "
                         f"grows with the square of the length); cut it, or raise --max-audio-seconds")
    if seconds < MIN_AUDIO_SECONDS:
        raise CheckError(f"{where}: {seconds:.3f} s of audio is shorter than the {MIN_AUDIO_SECONDS:g} s the "
                         f"encoder needs")


def audio_file(path, limit: float | None) -> None:
    """infer.py: the file exists, its header reads, its length is within the limits."""
    audio_length(path, audio_seconds(path), limit)


def audio_problems(records, limit: float | None = None) -> list[str]:
    """Every problem with the audio of manifest rows, one line each, from the file headers only:
    missing or unreadable file, offset past its end, offset + duration beyond it (by more than 10 ms),
    a duration too short to encode or over `limit`."""
    problems, lengths = [], {}
    for r in records:
        if r.audio not in lengths:
            try:
                lengths[r.audio] = audio_seconds(r.audio)
            except CheckError as e:
                lengths[r.audio] = str(e)
        length = lengths[r.audio]
        if isinstance(length, str):
            problems.append(f"{r.source}: field 'audio': {length}")
            continue
        duration = r.duration or max(length - r.offset, 0.0)  # no duration (task files): the rest of the file
        try:
            audio_length(r.audio, duration, limit, where=f"{r.source}: field 'duration'")
        except CheckError as e:
            problems.append(str(e))
        if r.offset >= length:
            problems.append(f"{r.source}: field 'offset': {r.offset:g} s is past the end of {r.audio} "
                            f"({length:.3f} s)")
        elif r.offset + duration > length + END_TOLERANCE_SECONDS:
            problems.append(f"{r.source}: field 'duration': offset {r.offset:g} s + duration {duration:g} s "
                            f"ends after {r.audio} ({length:.3f} s)")
    return problems


def manifest_audio(records, path, limit: float | None) -> None:
    """Before training or evaluation: the first audio problem of a manifest as one line (and how many more)."""
    problems = audio_problems(records, limit)
    if problems:
        more = f" (and {len(problems) - 1} more: `python data.py check {path}` lists them)" if len(problems) > 1 \
            else ""
        raise CheckError(problems[0] + more)


# ---------------------------------------------------------------------------------------------------
# Training data and outputs
# ---------------------------------------------------------------------------------------------------


def training_rows(records, path, what: str, limit: float | None) -> None:
    """train.py, per manifest: something to learn, and audio that can be read and encoded."""
    if what == "training":
        supervised_rows(records, path)
    manifest_audio(records, path, limit)


def supervised_rows(records, path) -> None:
    """A row whose response is empty and truncated has no token to learn (no text, no <|im_end|>): a manifest
    of only such rows trains on nothing, with a loss of exactly 0."""
    if all(r.truncated and not r.response for r in records):
        raise CheckError(f"training manifest {path}: every response is empty and truncated, so there is no "
                         f"token to learn (regenerate the targets with a larger --max-new-tokens)")


def batch_tokens(num_tokens: float, records, max_length: int | None) -> None:
    """Zero supervised tokens in a training batch: say which rows and why, instead of training on loss 0."""
    if num_tokens == 0:
        files = sorted({r.source.rpartition(":")[0] for r in records})
        cause = f"--max-length {max_length} cuts off every response" if max_length else \
            "every response is empty and truncated"
        raise CheckError(f"a training batch of {len(records)} rows from {', '.join(files)} (first: "
                         f"{records[0].source}) has no supervised token: {cause}")


def max_length_cut(e: ValueError, max_length: int | None) -> None:
    """llm.build_batch refuses rows whose audio placeholders --max-length cut off; name the flag."""
    if max_length and "audio frames" in str(e):
        raise CheckError(f"--max-length {max_length} cuts into the audio of a row ({first_line(e)}); raise it, "
                         f"or leave it out") from None


def checkpoint_stage(ckpt: dict, path, stage: int) -> None:
    """A stage-1 checkpoint holds the semantic projector, a stage-2 run trains the paralinguistic one."""
    written = ckpt.get("args", {}).get("stage", stage)
    if written != stage:
        raise CheckError(f"--resume: {path} was written by a stage-{written} run; this is stage {stage} "
                         f"(use another --exp, or leave out --resume)")


def encoder_folder(path, flag: str) -> None:
    """An encoder flag must name a Zipformer folder, not e.g. the LLM's (whose weights would not fit)."""
    config = json_file(Path(path) / "config.json")
    composite = any(f"{k}_config" in config for k in ("speech_encoder", "audio_encoder", "encoder"))
    kind = config.get("model_type", "zipformer")
    if kind != "zipformer" and not composite:
        raise CheckError(f"{flag} {path}: config.json describes a {kind!r} model, not a Zipformer encoder")


def json_file(path) -> dict:
    """A JSON object from `path`; missing or invalid files are named."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckError(f"{path}: not valid JSON ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckError(f"{path}: not valid JSON for a config (expected an object)")
    return obj


def weight_files(folder) -> None:
    """Open every safetensors file of a folder (header and size only): a truncated or corrupt file is named
    here rather than failing deep inside transformers."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as e:  # SafetensorError, or OSError from the file system
            raise CheckError(f"{path}: corrupt or truncated safetensors file ({first_line(e)})") from None


def model_files(root) -> None:
    """Every config.json and safetensors file of a release folder (root, llm/, the encoders) reads."""
    root = Path(root)
    for folder in (root, root / "llm", root / "speech_encoder", root / "paraling_encoder"):
        if (folder / "config.json").is_file():
            json_file(folder / "config.json")
        weight_files(folder)


def looks_local(name: str) -> bool:
    """A --model string meant as a local folder: absolute, relative (./, ../, ~), not of the hub's
    "owner/name" form, or under a folder that exists here (exp/stage2 when exp/ exists)."""
    parts = Path(name).parts
    return (name.startswith((".", "/", "~")) or name.count("/") != 1
            or (len(parts) > 1 and Path(parts[0]).is_dir()))


@contextlib.contextmanager
def cleaned_up(tmp, what: str):
    """Around writing `tmp` before it is renamed into place: on failure (a full disk) remove `tmp` and
    fail with one line instead of a traceback that leaves the temporary file behind."""
    try:
        yield
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise CheckError(f"{what}: {e}") from None


def finished_model(exp, overwrite: bool, resume) -> None:
    """A finished model in --exp is replaced only on request (--overwrite) or by continuing its run (--resume)."""
    path = Path(exp) / "model.safetensors"
    if path.exists() and not overwrite and not resume:
        raise CheckError(f"--exp {exp} already holds a finished model ({path}); pass --overwrite to replace it, "
                         f"--resume to continue its run, or choose another --exp")


def truncate_metrics(path, step: int) -> None:
    """After a resume from step N, metrics.jsonl keeps only the records up to N: the steps after the
    checkpoint are run again and would otherwise appear twice."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            rec = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:  # a line cut off by a kill
            continue
        # records of step N were logged before its checkpoint; the end event of a finished run after it
        if rec and (rec.get("step", 0) < step or (rec.get("step") == step and "event" not in rec)):
            keep.append(line)
    from data import write_atomic

    write_atomic(path, keep)


@contextlib.contextmanager
def exclusive_lock(path):
    """Hold an exclusive lock on `<path>.lock` for the duration of a run, so two runs never append to one
    output. The lock file records who holds it (pid, host), which the second run reports. flock is
    released by the kernel when the holder dies, so a killed run never leaves a stale lock."""
    import fcntl

    lock_path = Path(f"{path}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise CheckError(f"{path} is being written by another run ({holder}); wait for it to finish, "
                             f"or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
