"""Support module for generate_targets.py: the bookkeeping that loses no row (not the method).

Target generation runs for hours over millions of rows, so it promises:
  - every non-blank input line ends in the output or in `<out>.skipped.jsonl` with a reason (the
    official filters, unreadable lines, duplicate ids); `finish` checks in = out + skipped;
  - rows are appended batch by batch (files.append_jsonl); a re-run with the same output resumes by
    `id` (`resume`), after files.read_jsonl(repair=True) cut off a partial last line left by a kill;
  - the finished output is in input order (rewritten atomically by files.write_atomic);
  - `--shard i --nshards n` takes every n-th input line; `merge` joins finished shards and checks
    that each row is in exactly one of them.
It also holds the plumbing around the method: the backend choice and batching (the backends
themselves are in generate_targets.py), the optional zhconv, the output row, and the command-line
checks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib.util
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from support import checks
from support.checks import CheckError
from support.files import json_line, read_jsonl, write_atomic
from support.manifest import ManifestError, Record, parse_line


@dataclass
class Row:
    """One non-blank input line. `index` counts lines over all inputs, in order: the shard key and
    the order of the final output."""
    index: int
    source: str                 # "file:line"
    raw: str                    # the line as read (kept for the skipped file)
    record: Record | None = None
    prompt: object | None = None  # generate_targets.Prompt (support never imports a chapter)
    skip: str | None = None     # why it is not generated; None = generate


# ------------------------------------------------------------------------------------------------
# Reading the inputs: every line becomes a Row, good or not


def _open_lines(path):
    """Binary lines: a line that is not UTF-8 becomes a skipped row instead of killing the run."""
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def read_rows(in_paths) -> tuple[list[Row], int]:
    """Parse every line of every input with manifest.parse_line -> (rows, number of blank lines).
    Unreadable and malformed lines, and repeated ids, come back with their skip reason set."""
    rows, blank = [], 0
    for path in in_paths:
        folder = Path(path).resolve().parent
        with checks.readable(path), _open_lines(path) as f:  # a truncated .gz: one line, named
            for lineno, data in enumerate(f, start=1):
                source = f"{path}:{lineno}"
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    rows.append(Row(len(rows), source, data.decode("utf-8", "replace").rstrip("\n"),
                                    skip=f"unreadable: not UTF-8 ({e.reason} at byte {e.start})"))
                    continue
                if not line.strip():
                    blank += 1
                    continue
                row = Row(len(rows), source, line.rstrip("\n"))
                try:
                    row.record = parse_line(line, path, lineno, folder)
                except ManifestError as e:
                    row.skip = f"malformed: field '{e.field}': {e.what}"
                rows.append(row)
    _skip_repeated_ids(rows)
    return rows, blank


def _skip_repeated_ids(rows: list[Row]) -> None:
    # ids key resume and merge, so a second row with the same id cannot be told from the first
    first_seen: dict[str, str] = {}
    for row in rows:
        if row.skip is None:
            if row.record.id in first_seen:
                row.skip = f"duplicate id: {row.record.id!r} (first at {first_seen[row.record.id]})"
            else:
                first_seen[row.record.id] = row.source


# The official data filters (data_module.py `_filter_cutset`).
MIN_SECONDS, MAX_SECONDS, MAX_CHARS_PER_SECOND = 1.0, 30.0, 30


def filter_reason(record: Record, transcript: str) -> str | None:
    """Why the official filters drop this row (None: keep it); `transcript` is normalised."""
    if not MIN_SECONDS <= record.duration <= MAX_SECONDS:
        return f"duration: {record.duration:g} s is outside {MIN_SECONDS:g}-{MAX_SECONDS:g} s"
    if not transcript:
        if record.text.strip():
            return "empty text: nothing left after normalisation"
        return "empty text"
    if len(transcript) > MAX_CHARS_PER_SECOND * record.duration:
        return (f"text too long: {len(transcript)} chars in {record.duration:g} s "
                f"(> {MAX_CHARS_PER_SECOND} chars per second)")
    return None


def budget_batches(lengths: list[int], max_new_tokens: int, batch_tokens: int,
                   max_rows: int | None = None) -> list[list[int]]:
    """Row indices in batches, longest prompt first, while rows x (longest prompt + max_new_tokens)
    stays under `batch_tokens` (and at most `max_rows` rows). An over-long row still runs, alone."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current, width = [], [], 0
    for i in order:
        width_if_added = max(width, lengths[i]) + max_new_tokens
        too_many = max_rows is not None and len(current) >= max_rows
        if current and (too_many or (len(current) + 1) * width_if_added > batch_tokens):
            batches.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, lengths[i])
    return batches + ([current] if current else [])


# ------------------------------------------------------------------------------------------------
# Plumbing around the method: text, backend choice, the output row, the command line

ZHCONV_MISSING = ("zhconv is not installed: Chinese transcripts are NOT converted from Traditional "
                  "to Simplified Chinese as the official pipeline does, so targets of Traditional "
                  "text differ from the official ones (pip install zhconv)")


def to_simplified(text: str) -> str:
    """Traditional -> Simplified Chinese, as officially. zhconv is optional (CI and the English demo
    do without); Chinese text without it gets a warning, never a silent difference."""
    try:
        from zhconv import convert
    except ImportError:
        warnings.warn(ZHCONV_MISSING, stacklevel=3)  # names the caller of normalize_text
        return text
    return convert(text, "zh-cn")


@dataclass
class Generation:
    response: str
    truncated: bool   # hit max_new_tokens before the end-of-turn token: cut, not finished
    n_tokens: int     # generated tokens, end-of-turn included


def chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def use_vllm(backend: str, device: str | None = None) -> bool:
    """--backend vllm (refused without vLLM or on the CPU), or auto: vLLM when it is installed,
    CUDA works and no CPU device was asked for. Otherwise transformers, and checks.cpu_fallback
    stops a large model from landing on the CPU silently."""
    installed = importlib.util.find_spec("vllm") is not None
    on_cpu = device is not None and device.startswith("cpu")
    if backend == "vllm":
        if not installed:
            raise CheckError("--backend vllm: vLLM is not installed (pip install vllm), or "
                                    "use --backend hf")
        if on_cpu:
            raise CheckError("--backend vllm runs on GPUs only; drop --device cpu or use "
                                    "--backend hf")
        return True
    return backend == "auto" and installed and not on_cpu and checks.cuda_problem() is None


def target_row(row: Row, mode: str, gen: Generation, label: str, folder,
               backend: str | None = None) -> dict:
    """The input record (our schema, audio relative to the output's folder) plus the fields that
    train.py learns from: the prompt the LLM read and what it answered, and which backend
    generated it (greedy vLLM and transformers can differ in a token: resume never mixes them)."""
    p = row.prompt
    extra = {**row.record.extra, "backend": backend} if backend else row.record.extra
    rec = dataclasses.replace(row.record, mode=mode, system=p.system, instruction=p.instruction,
                              input_text=p.input_text, response=gen.response,
                              truncated=gen.truncated, model=label, extra=extra)
    return rec.to_json(relative_to=folder)


def check_args(parser, args) -> None:
    if not args.merge and args.mode is None:
        parser.error("--mode is required")
    # before the LLM loads, not after
    checks.positive_flags(parser, args, "max_new_tokens", "tensor_parallel_size", "max_model_len")
    if not 0 < args.gpu_memory_utilization <= 1:
        parser.error(f"--gpu-memory-utilization must be in (0, 1], got "
                     f"{args.gpu_memory_utilization:g}")


# ------------------------------------------------------------------------------------------------
# Shards and output files


def in_shard(row: Row, shard: int, nshards: int) -> bool:
    # round robin over the line index: deterministic, and every shard gets a similar length mix
    return row.index % nshards == shard


def shard_path(out, shard: int, nshards: int) -> Path:
    """out.jsonl -> out.shard2-of-4.jsonl (the output itself when there is one shard)."""
    out = Path(out)
    if nshards == 1:
        return out
    return out.with_name(f"{out.stem}.shard{shard}-of-{nshards}{out.suffix}")


def skipped_path(out) -> Path:
    return Path(f"{out}.skipped.jsonl")


@contextlib.contextmanager
def locked_output(out, shard: int, nshards: int):
    """Yield this shard's output path, locked (`<output>.lock`) for the whole run: two runs never
    append to one file; the second stops here, naming the first."""
    if not 0 <= shard < nshards:
        raise CheckError(f"--shard {shard} is not in 0..{nshards - 1}")
    path = shard_path(out, shard, nshards)
    if path.suffix == ".gz":
        raise CheckError("write a plain .jsonl (appends to gzip cannot be repaired after a kill); "
                         "compress later")
    path.parent.mkdir(parents=True, exist_ok=True)
    with checks.exclusive_lock(path):
        yield path


def skipped_line(row: Row) -> str:
    """A skipped row keeps what is needed to find and fix it: where it was, why, the line itself."""
    return json_line({"source": row.source, "reason": row.skip, "line": row.raw})


# ------------------------------------------------------------------------------------------------
# Resume


def resume(path: Path, rows: list[Row], mode: str, label: str,
           backend: str | None = None) -> dict[str, dict]:
    """id -> row already written to `path`, after checking it was made by this very job. A partial
    last line (a kill during an append) is cut off and will be generated again; any other line that
    is not a JSON object is corruption and stops the run."""
    try:
        lines = read_jsonl(path, repair=True)
    except ValueError as e:
        raise CheckError(f"{e}; the file is corrupt, refusing to append") from None
    todo_ids = {r.record.id for r in rows if r.skip is None}
    done, first = {}, {}
    for n, obj in lines:
        where = f"{path}:{n}"
        if obj.get("id") not in todo_ids:
            raise CheckError(f"{where}: id {obj.get('id')!r} is not a row of these inputs/this "
                             "shard; wrong --out, --in or --shard?")
        if obj["id"] in done:
            # an identical repeat (left by two runs before outputs were locked) is dropped; the
            # final rewrite in input order keeps one copy. A differing one cannot be decided here.
            if obj == done[obj["id"]]:
                continue
            raise CheckError(f"{where}: id {obj['id']!r} written twice with different content "
                             f"(first on line {first[obj['id']]})")
        if obj.get("mode") != mode or obj.get("model", "") != label:
            raise CheckError(f"{where}: written by mode={obj.get('mode')!r} "
                             f"model={obj.get('model')!r}, this run is mode={mode!r} "
                             f"model={label!r}; use another --out")
        if backend and obj.get("backend") != backend:
            raise CheckError(f"{where}: written by the {obj.get('backend')!r} backend, this run "
                             f"uses {backend!r}; resume with --backend {obj.get('backend')} or "
                             "use another --out")
        done[obj["id"]], first[obj["id"]] = obj, n
    return done


# ------------------------------------------------------------------------------------------------
# The end of a run: input order, the count check, the summary


@dataclass
class Summary:
    rows_in: int = 0
    rows_out: int = 0
    rows_skipped: int = 0
    blank_lines: int = 0
    resumed: int = 0             # rows found already written
    generated: int = 0           # rows generated by this run
    new_tokens: int = 0          # tokens generated by this run
    seconds: float = 0.0
    mean_response_chars: float = 0.0
    truncated_fraction: float = 0.0
    skip_reasons: dict = dataclasses.field(default_factory=dict)

    def report(self) -> str:
        rate = "-"
        if self.seconds > 0:
            rate = (f"{self.generated / self.seconds:.2f} rows/s, "
                    f"{self.new_tokens / self.seconds:.1f} tokens/s")
        lines = [f"in {self.rows_in} = out {self.rows_out} + skipped {self.rows_skipped}"
                 f"  ({self.blank_lines} blank lines ignored)",
                 f"this run: {self.generated} rows generated, {self.resumed} already done, "
                 f"{self.new_tokens} new tokens in {self.seconds:.1f} s ({rate})",
                 f"responses: mean {self.mean_response_chars:.1f} chars, "
                 f"truncated {100 * self.truncated_fraction:.1f}%"]
        lines += [f"  skipped {n:>6}  {reason}" for reason, n in sorted(self.skip_reasons.items())]
        return "\n".join(lines)


class Meter:
    """The progress bar (rows, tokens/s) and the run's counters in the summary."""

    def __init__(self, summary: Summary, total: int, desc: str, enabled: bool = True):
        from tqdm import tqdm

        self.summary, self.start = summary, time.perf_counter()
        self.bar = tqdm(total=total, unit="row", disable=not enabled, dynamic_ncols=True, desc=desc)

    def add(self, rows: int, new_tokens: int) -> None:
        self.summary.generated += rows
        self.summary.new_tokens += new_tokens
        self.bar.update(rows)
        seconds = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(tok_s=f"{self.summary.new_tokens / seconds:.1f}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        self.summary.seconds = time.perf_counter() - self.start


def _reason_kind(reason: str) -> str:
    """Every reason reads "<kind>: <detail>" (or just "<kind>"); the summary counts kinds."""
    return reason.split(":")[0]


def finish(rows: list[Row], done: dict[str, dict], out: Path, summary: Summary) -> Summary:
    """Rewrite the output in input order, write the skipped file, check in = out + skipped."""
    generated = [r for r in rows if r.skip is None]
    missing = [r.record.id for r in generated if r.record.id not in done]
    if missing:
        raise CheckError(f"{len(missing)} rows missing from {out} (first: {missing[:3]}); "
                         "run again to resume")
    skipped = [r for r in rows if r.skip is not None]
    objs = [done[r.record.id] for r in generated]
    write_atomic(out, [json_line(o) for o in objs], f"could not write {out}")  # disk full: 1 line
    write_atomic(skipped_path(out), [skipped_line(r) for r in skipped],
                 f"could not write {skipped_path(out)}")
    summary.rows_in, summary.rows_out = len(rows), len(generated)
    summary.rows_skipped = len(skipped)
    if summary.rows_in != summary.rows_out + summary.rows_skipped:  # the promise: no row is lost
        raise AssertionError(f"count mismatch: in {summary.rows_in} != out {summary.rows_out} + "
                             f"skipped {summary.rows_skipped}")
    if objs:
        summary.mean_response_chars = sum(len(o["response"]) for o in objs) / len(objs)
        summary.truncated_fraction = sum(bool(o["truncated"]) for o in objs) / len(objs)
    for r in skipped:
        kind = _reason_kind(r.skip)
        summary.skip_reasons[kind] = summary.skip_reasons.get(kind, 0) + 1
    return summary


def merge(rows: list[Row], blank: int, out, nshards: int, mode: str | None) -> Summary:
    """Combine the finished shards of `out` in input order. `rows` is the plan of all inputs, so
    every row that should have been generated is looked up: a row in no shard is a gap, in two a
    duplicate. `mode`, if given, must be the shards' mode."""
    expected = {r.record.id for r in rows if r.skip is None}
    done, errors, modes = {}, [], set()
    for shard in range(nshards):
        path = shard_path(out, shard, nshards)
        if not path.exists():
            errors.append(f"{path}: missing")
            continue
        try:
            lines = read_jsonl(path)
        except ValueError as e:
            raise CheckError(f"{e} (an unfinished or corrupt shard?)") from None
        for n, obj in lines:
            modes.add((obj.get("mode"), obj.get("model")))
            if obj.get("id") not in expected:
                errors.append(f"{path}:{n}: id {obj.get('id')!r} is not a generated row of these "
                              "inputs")
            elif obj["id"] in done:
                errors.append(f"{path}:{n}: duplicate id {obj['id']!r}")
            else:
                done[obj["id"]] = obj
    gaps = [i for i in expected if i not in done]
    if gaps:
        errors.append(f"{len(gaps)} rows in no shard (gaps), e.g. {sorted(gaps)[:3]}")
    if len(modes) > 1 or (mode and modes and next(iter(modes))[0] != mode):
        errors.append(f"shards disagree on mode/model (or with --mode): {sorted(modes, key=str)}")
    if errors:
        raise CheckError("merge failed: " + "; ".join(errors[:20]))  # one line
    return finish(rows, done, Path(out), Summary(blank_lines=blank))
