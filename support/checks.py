"""Support code: the checks that turn bad input and faults into one clear line (not the method).

The tutorial files (train.py, infer.py, evaluate.py, generate_targets.py) call these with one line
each, so their reading path stays about AZeroS. Every check fails with `CheckError`: a single line
naming the file (manifest file:line and field, where there is one) and the flag that changes it;
`run_command`, every command's `cli`, prints it as `error: <line>` and exits with status 1.

  1. Arguments: positive budgets, sampling ranges, a device that exists, input files.
  2. Audio: length limits, and header-only checks of every file a manifest names.
  3. Training: rows with something to learn, checkpoints of the right stage, metrics after a resume.
  4. Model folders: configs and weights that read, local paths that are not hub ids.
  5. Outputs: a finished model is never replaced silently; temporary files are cleaned up; one
     generation run at a time per output (an exclusive lock).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import socket
import sys
from pathlib import Path

from support import files

# The official data module drops cuts longer than 50 s. The encoders attend over the whole
# utterance, so their memory grows with the square of its length (BENCHMARKS.md, "Audio length
# and memory"): longer audio is refused, never cut silently.
MAX_AUDIO_SECONDS = 50.0
MAX_AUDIO_HELP = f"refuse longer audio (default {MAX_AUDIO_SECONDS:g} s; 0: no limit)"
# Models above this many parameters are refused on the CPU unless --device cpu is given (a 7B LLM
# would run there in fp32 for days); SmolLM2-135M and the test models are far below.
CPU_PARAMS = 500_000_000
# The Zipformer front end needs 9 fbank frames (90 ms) for any output (zipformer.MIN_INPUT_FRAMES).
MIN_AUDIO_SECONDS = 0.09
# offset + duration may run past the end of the file by one fbank frame shift (10 ms) at most:
# durations rounded to the millisecond, or measured at another sample rate, land within it.
END_TOLERANCE_SECONDS = 0.01


class CheckError(ValueError):
    """Bad input or a fault the user can fix; command lines print it as one line, no traceback.
    The one error type of the project: AudioError, ManifestError, LabelError, TrainError and
    LayoutError are CheckErrors that also carry what they name (file, line, field)."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def expected_failure(e: BaseException) -> bool:
    """A fault of the input (files, audio, model folder) that a command line reports in one line;
    anything else is a bug and keeps its traceback."""
    return isinstance(e, (CheckError, FileNotFoundError, ValueError, OSError, RuntimeError))


def print_error(line: str) -> None:
    print(line, file=sys.stderr)


def run_command(main, argv=None, report=print_error) -> int:
    """The one error path of the commands: every `cli(argv)` is `run_command(main, argv)`. main
    does the work and raises; here a user-fixable failure (expected_failure) becomes the single
    line `error: <first line>` (exit status 1), Ctrl-C exit status 130, and a bug keeps its
    traceback. `report` prints the line (train.py's also stops every rank under torchrun).
    AZEROS_TRACEBACK=1 in the environment keeps the traceback of every failure, for debugging (a
    RuntimeError can be a bad file or a bug)."""
    try:
        main(argv)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not expected_failure(e) or os.environ.get("AZEROS_TRACEBACK", "") not in ("", "0"):
            raise
        report(f"error: {first_line(e)}")
        return 1
    return 0


# --------------------------------------------------------------------------------------------------
# 1. Arguments
# --------------------------------------------------------------------------------------------------


def numbers(args, positive=(), non_negative=()) -> None:
    """Numeric flags: finite (NaN passes every `<= 0` test, so `--lr nan` trained NaN and
    `--max-audio-seconds nan` turned the limit off; inf overflowed the step count), and positive or
    not negative where named (a 0 for --save-every divided by zero after the first step)."""
    for name in (*positive, *non_negative):
        value, flag = getattr(args, name), f"--{name.replace('_', '-')}"
        if value is None:
            continue
        if not math.isfinite(value):
            raise CheckError(f"{flag} must be a finite number, got {value}")
        if name in positive and value <= 0:
            raise CheckError(f"{flag} must be positive, got {value:g}")
        if value < 0:
            raise CheckError(f"{flag} must not be negative, got {value:g}")


def positive(args, *names: str) -> None:
    """Refuse zero or negative budgets (--max-steps 0 trained nothing and still exported a
    model)."""
    numbers(args, positive=names)


def positive_flags(parser, args, *names: str, non_negative=()) -> None:
    """`numbers` for a command that checks its flags before loading anything: the same message,
    as the parser's usage error (exit code 2)."""
    try:
        numbers(args, positive=names, non_negative=non_negative)
    except CheckError as e:
        parser.error(str(e))


def sampling(args) -> None:
    """--top-p is a probability mass in (0, 1] and only means something when sampling; a
    temperature cannot be negative (0: greedy)."""
    numbers(args, non_negative=("temperature",))
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CheckError(f"--top-p must be in (0, 1], got {args.top_p:g}")
    if args.top_p is not None and not args.temperature:
        raise CheckError("--top-p applies only when sampling: add --temperature T (> 0); "
                         "without it decoding is greedy")


def device(name: str | None) -> str | None:
    """A --device this machine has (cuda without CUDA failed later, with a torch traceback)."""
    import torch

    if name and name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CheckError(f"--device {name}: CUDA is not available on this machine; "
                             "use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise CheckError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return name


def cuda_problem() -> str | None:
    """None when CUDA works on this machine, else why not. `is_available()` alone is not enough:
    a driver too old for the wheel, or a GPU in exclusive use, fails at the first allocation."""
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda
        return ("this torch is a CPU-only build" if built is None
                else f"torch (built for CUDA {built}) finds no usable GPU")
    try:
        torch.zeros(1, device="cuda").add_(1).item()
    except RuntimeError as e:
        return f"CUDA fails at its first allocation ({first_line(e)})"
    return None


def pick_device(name: str | None) -> str:
    """--device as given (checked), else "cuda" when CUDA works, else "cpu". Entry points call
    cpu_fallback next, so that "else cpu" is never silent for a large model."""
    if name:
        return device(name)
    return "cuda" if cuda_problem() is None else "cpu"


def cpu_fallback(n_params: int | None, device_arg: str | None, chosen: str, flag: str) -> None:
    """A model this large on the CPU is a mistake, not a choice, unless --device cpu says so: a 7B
    LLM trains there in fp32 at minutes per step. `n_params` None: unknown, nothing refused."""
    if device_arg or not chosen.startswith("cpu") or not n_params or n_params <= CPU_PARAMS:
        return
    raise CheckError(f"{flag} has {n_params / 1e9:.2f}B parameters and would run on the CPU "
                     f"({cuda_problem()}); pass --device cpu to run it there anyway")


def infer_args(args) -> None:
    """infer.py's command line: every audio file and option, before the slow imports and the model
    (a missing file or bad audio after a minute of loading is a poor way to learn of it)."""
    numbers(args, positive=("max_new_tokens",), non_negative=("max_audio_seconds",))
    for path in args.audio:
        audio_file(path, args.max_audio_seconds)
    sampling(args)
    device(args.device)


# train.py's numeric flags: those that must be > 0, and those where 0 means "off" or "none"
TRAIN_POSITIVE = ("max_steps", "epochs", "lr", "max_duration", "max_batch", "num_buckets",
                  "lr_batches", "decay_steps", "grad_accum", "log_every", "valid_every",
                  "save_every", "keep_last")
TRAIN_NON_NEGATIVE = ("max_length", "max_tokens", "num_workers", "max_audio_seconds",
                      "warmup_steps", "min_lr", "weight_decay", "grad_clip", "average_period")


def training_args(args) -> None:
    """train.py's command line, before anything is loaded."""
    numbers(args, positive=TRAIN_POSITIVE, non_negative=TRAIN_NON_NEGATIVE)
    if not 0 <= args.betas[0] < 1 or not 0 <= args.betas[1] < 1:
        raise CheckError(f"--betas must be two numbers in [0, 1), got {args.betas[0]:g} "
                         f"{args.betas[1]:g}")
    device(args.device)
    if args.stage == 1 and args.init:
        raise CheckError("--init is for stage 2 (the stage-1 model to start from); stage 1 starts "
                         "from --llm and --speech-encoder")
    finished_model(args.exp, args.overwrite, args.resume)


def manifest_weight(spec: str, weight: float) -> None:
    """--train JSONL:WEIGHT repeats a manifest WEIGHT times an epoch: a positive, finite number."""
    if not (math.isfinite(weight) and weight > 0):
        raise CheckError(f"--train {spec}: the weight after ':' must be a positive number, got "
                         f"{weight:g} (1: once an epoch, 0.5: a random half)")


def context(llm_config, prompt_tokens: int, max_new_tokens: int) -> None:
    """Before generating: the prompt (text and audio frames) and the answer fit the LLM's context
    (max_position_embeddings). A 100k-character prompt ran on past it, and --max-new-tokens
    100000000 was still generating after 300 s; the context is the cap on both."""
    limit = getattr(llm_config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return  # the config does not say: nothing to check against
    if prompt_tokens >= limit:
        raise CheckError(f"a prompt of {prompt_tokens} tokens (text and audio frames) does not fit "
                         f"the LLM's context of {limit} tokens: shorten the prompt or the audio")
    if prompt_tokens + max_new_tokens > limit:
        raise CheckError(f"--max-new-tokens {max_new_tokens} after a prompt of {prompt_tokens} "
                         f"tokens runs past the LLM's context of {limit} tokens: use at most "
                         f"{limit - prompt_tokens}")


def files_exist(paths, flag: str) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise CheckError(f"{flag} {path}: no such file")


@contextlib.contextmanager
def readable(path):
    """Around reading an input file: a truncated .gz or an I/O error names the file, in one line."""
    try:
        yield
    except (OSError, EOFError) as e:
        raise CheckError(f"{path}: unreadable ({first_line(e)})") from None


# --------------------------------------------------------------------------------------------------
# 2. Audio
# --------------------------------------------------------------------------------------------------


def audio_seconds(path) -> float:
    """The length of an audio file from its header alone (no samples are read)."""
    import soundfile as sf

    if not os.path.isfile(path):
        raise CheckError(f"{path}: {missing_audio(path)}")
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile's error types differ between versions
        raise CheckError(f"{path}: unreadable audio ({first_line(e)})") from None
    return info.frames / info.samplerate


def missing_audio(path) -> str:
    """Why `path` is no audio file: a folder named x.wav was reported as "not found"."""
    return "a folder, not an audio file" if os.path.isdir(path) else "audio file not found"


def audio_length(path, seconds: float, limit: float | None, where: str = "") -> None:
    """Refuse audio over `limit` seconds, or too short for the encoder to give any frame."""
    where = where or str(path)
    if limit and seconds > limit:
        raise CheckError(f"{where}: {seconds:.1f} s of audio is over the limit of {limit:g} s (the "
                         "encoders' memory grows with the square of the length); cut it, or raise "
                         "--max-audio-seconds")
    if seconds < MIN_AUDIO_SECONDS:
        raise CheckError(f"{where}: {seconds:.3f} s of audio is shorter than the "
                         f"{MIN_AUDIO_SECONDS:g} s the encoder needs")


def audio_file(path, limit: float | None) -> None:
    """infer.py: the file exists, its header reads, its length is within the limits."""
    if os.path.isdir(path):
        raise CheckError(f"{path}: {missing_audio(path)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {path}")
    audio_length(path, audio_seconds(path), limit)


def audio_problems(records, limit: float | None = None) -> list[str]:
    """Every problem with the audio of manifest rows, one line each, from the file headers only:
    missing or unreadable file, offset past the end, offset + duration beyond it (by more than
    END_TOLERANCE_SECONDS), a duration too short to encode or over `limit`."""
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
        duration = r.duration or max(length - r.offset, 0.0)  # none given: the rest of the file
        try:
            audio_length(r.audio, duration, limit, where=f"{r.source}: field 'duration'")
        except CheckError as e:
            problems.append(str(e))
        if r.offset >= length:
            problems.append(f"{r.source}: field 'offset': {r.offset:g} s is past the end of "
                            f"{r.audio} ({length:.3f} s)")
        elif r.offset + duration > length + END_TOLERANCE_SECONDS:
            problems.append(f"{r.source}: field 'duration': offset {r.offset:g} s + duration "
                            f"{duration:g} s ends after {r.audio} ({length:.3f} s)")
    return problems


def manifest_audio(records, path, limit: float | None) -> None:
    """Before training or evaluation: the first audio problem of a manifest, and how many more."""
    problems = audio_problems(records, limit)
    if len(problems) == 1:
        raise CheckError(problems[0])
    if problems:
        raise CheckError(f"{problems[0]} (and {len(problems) - 1} more: `python data.py check "
                         f"{path}` lists them)")


# --------------------------------------------------------------------------------------------------
# 3. Training
# --------------------------------------------------------------------------------------------------


def training_rows(records, path, what: str, limit: float | None) -> None:
    """train.py, per manifest: something to learn, and audio that can be read and encoded."""
    if what == "training":
        supervised_rows(records, path)
    manifest_audio(records, path, limit)


def supervised_rows(records, path) -> None:
    """A response that is empty and truncated has no token to learn (no text, no <|im_end|>): a
    manifest of only such rows trained on nothing, with a loss of exactly 0."""
    if all(r.truncated and not r.response for r in records):
        raise CheckError(f"training manifest {path}: every response is empty and truncated, so "
                         "there is no token to learn (regenerate with a larger --max-new-tokens)")


def batch_tokens(num_tokens: float, records, max_length: int | None) -> None:
    """Zero supervised tokens in a training batch: name its rows and the cause, do not train."""
    if num_tokens == 0:
        sources = ", ".join(sorted({r.source.rpartition(":")[0] for r in records}))
        empty = all(not r.response and r.truncated for r in records)  # no row has anything
        cause = ("every response is empty and truncated" if empty or not max_length
                 else f"--max-length {max_length} cuts off every response")
        raise CheckError(f"a training batch of {len(records)} rows from {sources} (first: "
                         f"{records[0].source}) has no supervised token: {cause}")


def max_length_cut(e: ValueError, max_length: int | None) -> None:
    """llm.build_batch refuses a row whose audio --max-length cut off: name the flag."""
    if max_length and "audio frames" in str(e):
        raise CheckError(f"--max-length {max_length} cuts into the audio of a row "
                         f"({first_line(e)}); raise it, or --max-length 0 for no limit") from None


def checkpoint_stage(ckpt: dict, path, stage: int) -> None:
    """A stage-1 checkpoint holds the speech projector; stage 2 trains the paralinguistic one."""
    written = ckpt.get("args", {}).get("stage", stage)
    if written != stage:
        raise CheckError(f"--resume: {path} was written by a stage-{written} run; this is stage "
                         f"{stage} (use another --exp, or leave out --resume)")


def checkpoint_shapes(ckpt: dict, model, names) -> None:
    """A resumed checkpoint's projectors have this model's shapes: one trained with an LLM of
    another hidden size (or another encoder) failed inside load_state_dict with a traceback."""
    for name in names:
        own, saved = getattr(model, name).state_dict(), ckpt["projectors"].get(name, {})
        bad = [f"{name}.{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in saved.items()
               if k in own and v.shape != own[k].shape]
        if bad or not saved:
            old = ckpt.get("args", {})
            raise CheckError(
                f"--resume: the checkpoint of step {ckpt['step']} does not fit this model "
                f"({bad[0] if bad else f'no {name}'}): it was trained with --llm {old.get('llm')} "
                f"and --speech-encoder {old.get('speech_encoder')}; resume with those, or start "
                "afresh in another --exp")


# where a composite (whole-model) config keeps its encoder's config: `<key>_config`
ENCODER_CONFIG_KEYS = ("speech_encoder", "audio_encoder", "encoder")


def encoder_folder(path, flag: str) -> None:
    """An encoder flag must name a Zipformer (or transformers Whisper) folder, not e.g. an LLM's."""
    config = json_file(Path(path) / "config.json")
    composite = any(f"{k}_config" in config for k in ENCODER_CONFIG_KEYS)
    kind = config.get("model_type", "zipformer")
    if kind not in ("zipformer", "whisper") and not composite:
        raise CheckError(f"{flag} {path}: config.json describes a {kind!r} model, not a Zipformer "
                         "or Whisper encoder")


def truncate_log(path, keep) -> None:
    """A resumed run keeps only the records of a step log (metrics.jsonl, batches.rankN.jsonl) for
    which keep(record) holds: the steps after its checkpoint run again and would otherwise appear
    twice. A partial last line (a kill during an append) is cut with a message; the file is
    rewritten atomically (files.write_atomic), so a kill here cannot lose the log."""
    try:
        rows = files.read_jsonl(path, repair=True)
    except ValueError as e:  # a line broken in the middle of the log: not ours to drop
        raise CheckError(f"{e}; move the file away to start the log afresh") from None
    if Path(path).exists():
        files.write_atomic(path, (files.json_line(rec) for _, rec in rows if keep(rec)))


# --------------------------------------------------------------------------------------------------
# 4. Model folders
# --------------------------------------------------------------------------------------------------


def json_file(path) -> dict:
    """A JSON object from `path`; a missing or invalid file is named."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckError(f"{path}: not valid JSON ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckError(f"{path}: not valid JSON for a config (expected an object)")
    quoted_numbers(obj, path)
    return obj


NUMBER = re.compile(r"[+-]?\d+(\.\d*)?([eE][+-]?\d+)?")


def quoted_numbers(config: dict, path, where: str = "") -> None:
    """A number written as a string ("ds_rate": "4", "vocab_size": "608") failed deep inside torch
    with a traceback: name the field. Version strings and names are text, whatever they hold."""
    for key, value in config.items():
        name = f"{where}{key}"
        if isinstance(value, dict):
            quoted_numbers(value, path, f"{name}.")
        elif (isinstance(value, str) and NUMBER.fullmatch(value.strip())
              and not key.endswith(("version", "name_or_path"))):
            raise CheckError(f"{path}: field '{name}' is the string {value!r}, not a number; "
                             f"write it without quotes")


def weight_files(folder) -> None:
    """Open every safetensors file of a folder (reads the header, compares the size): a truncated or
    corrupt file is named here instead of failing deep inside a library."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as e:  # SafetensorError, or an OSError from the file system
            raise CheckError(f"{path}: corrupt or truncated safetensors file "
                             f"({first_line(e)})") from None


def model_files(root) -> None:
    """Every config.json and safetensors file of a release folder (root, llm/, encoders) reads."""
    root = Path(root)
    for folder in (root, root / "llm", root / "speech_encoder", root / "paraling_encoder"):
        if (folder / "config.json").is_file():
            json_file(folder / "config.json")
        weight_files(folder)


def looks_local(name: str) -> bool:
    """A --model meant as a local folder: absolute or relative (/, ., ~), not of the hub's
    "owner/name" form, or below a folder that exists here (exp/stage2 when exp/ exists)."""
    parts = Path(name).parts
    return (name.startswith((".", "/", "~")) or name.count("/") != 1
            or (len(parts) > 1 and Path(parts[0]).is_dir()))


# --------------------------------------------------------------------------------------------------
# 5. Outputs
# --------------------------------------------------------------------------------------------------


def finished_model(exp, overwrite: bool, resume) -> None:
    """A finished model in --exp is replaced only on request (--overwrite) or by its own run
    continuing (--resume)."""
    path = Path(exp) / "model.safetensors"
    if path.exists() and not overwrite and not resume:
        raise CheckError(f"--exp {exp} already holds a finished model ({path}); pass --overwrite "
                         "to replace it, --resume to continue its run, or choose another --exp")


@contextlib.contextmanager
def written(path, what: str):
    """files.atomic_path for a tutorial script: yields a temporary path that becomes `path` when the
    block ends; on failure, e.g. a full disk, it is removed and the run fails with one line."""
    try:
        with files.atomic_path(path, what) as tmp:
            yield tmp
    except files.WriteError as e:
        raise CheckError(str(e)) from None


@contextlib.contextmanager
def exclusive_lock(path, name: str | None = None, flag: str = "--out"):
    """Hold an exclusive lock on `<path>.lock` during a run, so two runs never append to one output.
    The lock file says who holds it (pid, host), which a second run reports (as `name`, else the
    path; `flag` chooses another output). The kernel releases a flock when its holder dies, so a
    killed run leaves no stale lock (the file itself stays)."""
    import fcntl

    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise CheckError(f"{name or path} is being written by another run ({holder}); wait "
                             f"for it to finish, or use another {flag}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
