"""Support module (not the method): manifests in, Records out, and the `check` command line.

A manifest lists utterances, one JSON object a line (.jsonl, or .jsonl.gz). Two schemas are read:
  - ours (docs/data.md): {"id", "audio", "duration", "text", "offset", "meta", ...}, plus the
    fields generate_targets.py adds (mode, system, instruction, input_text, response, truncated,
    model);
  - Lhotse MonoCut lines (`lhotse cut simple`, the released AZeroS manifests), read the way
    Lhotse means them: relative paths against the working directory, one supervision per cut,
    labels in the official vocabulary (labels.py).
Both become a `Record`, the object data.py's DataLoader carries. Nothing is skipped silently: a bad
line raises ManifestError naming file, line and field; `python data.py check m.jsonl ...` (the same
as `python manifest.py check ...`) lists every problem of a manifest at once.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from support import checks, labels
from support.files import json_line, write_atomic


@dataclass
class Record:
    """One utterance: a line of our JSONL manifest (docs/data.md), plus the fields that
    generate_targets.py adds (mode ... model). `audio` is always an absolute, resolved path."""

    id: str
    audio: str
    duration: float
    text: str = ""
    language: str | None = None
    offset: float = 0.0
    meta: dict = field(default_factory=dict)
    mode: str | None = None
    system: str | None = None
    instruction: str | None = None
    input_text: str | None = None
    response: str | None = None
    truncated: bool = False
    model: str | None = None
    channel: int | None = None  # one channel of a multi-channel file (None: average them)
    extra: dict = field(default_factory=dict)  # unknown keys: a read/write round trip keeps them
    source: str = ""  # "path/to/manifest.jsonl:LINE", for error messages

    def to_json(self, relative_to: str | os.PathLike | None = None) -> dict:
        """Back to our JSONL schema. None fields are dropped; with `relative_to` (a folder) the
        audio path is written relative to it, the way a manifest next to its audio usually is."""
        out = {"id": self.id, "audio": self.audio, "duration": self.duration, "text": self.text}
        if relative_to is not None:
            out["audio"] = os.path.relpath(self.audio, relative_to)
        if self.language is not None:
            out["language"] = self.language
        if self.offset:
            out["offset"] = self.offset
        out["meta"] = dict(self.meta)
        for name in ("mode", "system", "instruction", "input_text", "response"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.response is not None or self.truncated:
            out["truncated"] = self.truncated
        if self.model is not None:
            out["model"] = self.model
        if self.channel is not None:
            out["channel"] = self.channel
        out.update(self.extra)
        return out


class ManifestError(checks.CheckError):
    """A malformed manifest line. The message reads "<file>:<line>: field '<name>': <what>"."""

    def __init__(self, file, line: int, name: str, what: str):
        self.file, self.line, self.field, self.what = str(file), line, name, what
        super().__init__(f"{file}:{line}: field '{name}': {what}")


_OPTIONAL_STR_FIELDS = ("language", "mode", "system", "instruction", "input_text", "response",
                        "model")
_KNOWN_FIELDS = {"id", "audio", "duration", "text", "offset", "meta", "truncated", "channel",
                 *_OPTIONAL_STR_FIELDS}
# Texts that become prompt or answer tokens, and the LLM's audio placeholder (llm.AUDIO_TOKEN,
# repeated here so reading a manifest imports no model code): no text may contain it.
_TEXT_FIELDS = ("text", "system", "instruction", "input_text", "response")
AUDIO_TOKEN = "<|AUDIO|>"
# Lhotse marks a generation that hit max_new_tokens by appending this to the response
# (scripts/data_generation/run_data_generation.py); we turn it into `truncated=True`.
_LHOTSE_TRUNCATED_TAG = "<|truncated|>"
# What fixes a cut this reader cannot take as it is (several supervisions, or a transform such as
# speed perturbation): our preparation splits it, and writes transformed audio through Lhotse.
_PREPARE_CUTS = "python prepare.py cuts {file} OUT_DIR"


# --------------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------------


def read_manifest(path) -> list[Record]:
    """Read a manifest (our JSONL or official Lhotse cuts; .jsonl or .jsonl.gz) into Records.

    Nothing is skipped silently: the first malformed line raises ManifestError with file, line and
    field. (Filtering by duration etc. is the caller's decision, made explicitly.)
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    records = []
    for _, item in iter_manifest_lines(path):
        if isinstance(item, ManifestError):
            raise item
        records.append(item)
    return records


def write_manifest(records, path, relative: bool = False) -> None:
    """Write Records as our JSONL (gzip if the name ends in .gz, like the released cuts), all or
    nothing (files.write_atomic). Audio paths are absolute unless `relative=True` (then relative to
    the new manifest's folder)."""
    folder = Path(path).resolve().parent if relative else None
    write_atomic(path, (json_line(rec.to_json(relative_to=folder)) for rec in records))


def iter_manifest_lines(path):
    """Yield (line_number, Record-or-ManifestError) for every non-blank line, without stopping at
    the first error. `read_manifest` raises the first error; the `check` CLI collects them all."""
    seen: dict[str, int] = {}
    folder = Path(path).resolve().parent
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:  # bytes, so a bad UTF-8 line is reported with its line number
        for lineno, raw in enumerate(f, start=1):
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    what = f"not valid UTF-8 ({e.reason} at byte {e.start})"
                    raise ManifestError(path, lineno, "<json>", what) from e
                rec = parse_line(line, path, lineno, folder)
                if rec is None:
                    continue
                if rec.id in seen:
                    what = f"duplicate id {rec.id!r} (first on line {seen[rec.id]})"
                    raise ManifestError(path, lineno, "id", what)
                seen[rec.id] = lineno
                yield lineno, rec
            except ManifestError as e:
                yield lineno, e


def parse_line(line: str, file, lineno: int, folder: Path | None = None) -> Record | None:
    """One manifest line -> Record (None if blank). Raises ManifestError naming the field."""
    if not line.strip():
        return None
    check = _LineChecker(file, lineno)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        check.fail("<json>", f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        check.fail("<json>", f"a line must be a JSON object, got {type(obj).__name__}")
    folder = Path(file).resolve().parent if folder is None else folder
    parse = _record_from_lhotse if _looks_like_lhotse(obj) else _record_from_ours
    rec = parse(obj, folder, check)
    for name in _TEXT_FIELDS:  # the audio placeholder in a text would take a slot of the audio
        if AUDIO_TOKEN in (getattr(rec, name) or ""):
            check.fail(name, f"contains {AUDIO_TOKEN}, the token that marks where audio goes in a "
                             "prompt; remove it from the text")
    rec.source = f"{file}:{lineno}"
    return rec


def resolve_audio(audio: str, folder: Path) -> str:
    """Relative audio paths of our JSONL are relative to the manifest's folder (not to the working
    directory), so a dataset folder can be moved or mounted anywhere. (Lhotse cuts differ: Lhotse
    opens a relative source from the working directory, and _record_from_lhotse does the same.)"""
    path = Path(os.path.expanduser(audio))
    return str(path if path.is_absolute() else (folder / path).resolve())


# --------------------------------------------------------------------------------------------------
# The two schemas
# --------------------------------------------------------------------------------------------------


def _is_number(x) -> bool:
    # bool is a subclass of int in Python; `"duration": true` is a mistake, not 1 second.
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _LineChecker:
    """Raises ManifestError for one line with the file and line number filled in."""

    def __init__(self, file, line: int):
        self.file, self.line = file, line

    def fail(self, name: str, what: str):
        raise ManifestError(self.file, self.line, name, what)

    def string(self, obj: dict, name: str, required: bool = False, label: str | None = None):
        label = label or name
        if name not in obj or obj[name] is None:
            if required:
                self.fail(label, "missing")
            return None
        if not isinstance(obj[name], str):
            self.fail(label, f"must be a string, got {type(obj[name]).__name__} {obj[name]!r}")
        if required and not obj[name]:
            self.fail(label, "must not be empty")
        return obj[name]

    def seconds(self, obj: dict, name: str, required: bool = False, positive: bool = False,
                label=None):
        label = label or name
        if name not in obj or obj[name] is None:
            if required:
                self.fail(label, "missing")
            return None
        value = obj[name]
        if not _is_number(value):
            self.fail(label, f"must be a number of seconds, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            self.fail(label, f"must be finite, got {value!r}")
        if positive and value <= 0:
            self.fail(label, f"must be positive, got {value!r}")
        if value < 0:
            self.fail(label, f"must not be negative, got {value!r}")
        return float(value)


def _record_from_ours(obj: dict, folder: Path, check: _LineChecker) -> Record:
    """Our JSONL schema (docs/data.md): id, audio, duration required; everything else optional."""
    rec = Record(
        id=check.string(obj, "id", required=True),
        audio=check.string(obj, "audio", required=True),
        duration=check.seconds(obj, "duration", required=True, positive=True),
    )
    rec.audio = resolve_audio(rec.audio, folder)
    rec.text = check.string(obj, "text") or ""
    rec.offset = check.seconds(obj, "offset") or 0.0
    for name in _OPTIONAL_STR_FIELDS:
        setattr(rec, name, check.string(obj, name))
    meta = obj.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        check.fail("meta", f"must be an object, got {type(meta).__name__}")
    for key, value in meta.items():
        if value is not None and not isinstance(value, (str, int, float)):
            check.fail(f"meta.{key}", f"must be a string or number, got {type(value).__name__}")
    rec.meta = dict(meta)
    truncated = obj.get("truncated", False)
    if not isinstance(truncated, bool):
        check.fail("truncated", f"must be true or false, got {truncated!r}")
    rec.truncated = truncated
    channel = obj.get("channel")
    bad_channel = not isinstance(channel, int) or isinstance(channel, bool) or channel < 0
    if channel is not None and bad_channel:
        check.fail("channel", f"must be a non-negative integer, got {channel!r}")
    rec.channel = channel
    rec.extra = {k: v for k, v in obj.items() if k not in _KNOWN_FIELDS}
    return rec


def _looks_like_lhotse(obj: dict) -> bool:
    return "recording" in obj or "supervisions" in obj or "type" in obj


def _record_from_lhotse(obj: dict, folder: Path, check: _LineChecker) -> Record:
    """A Lhotse MonoCut line (`lhotse cut simple`, the released AZeroS manifests) -> Record.

    cut.id -> id; cut.start/duration -> offset/duration; recording.sources[0].source -> audio
    (relative: from the working directory, as Lhotse opens it); the supervision's
    text/language -> text/language (names such as "Chinese" -> "zh"); gender (a supervision field)
    and custom age_group (or age)/emotion -> meta, in the official vocabulary (labels.py); custom
    response/instruction/input_text/from_model -> the generate_targets fields. What would be
    mis-read silently raises: MixedCut/PaddingCut, URL/in-memory sources, recording transforms
    (speed perturbation), several supervisions or one that leaves part of the cut without text;
    the message names the command that rewrites such cuts.
    """
    kind = obj.get("type", "MonoCut")
    if kind != "MonoCut":
        check.fail("type", f"unsupported Lhotse cut type {kind!r} (only MonoCut)")
    cut_id = check.string(obj, "id", required=True)
    duration = check.seconds(obj, "duration", required=True, positive=True)
    start = check.seconds(obj, "start") or 0.0

    recording = obj.get("recording")
    if not isinstance(recording, dict):
        check.fail("recording", "missing or not an object (an unknown Lhotse structure?)")
    sources = recording.get("sources")
    if not isinstance(sources, list) or not sources or not isinstance(sources[0], dict):
        check.fail("recording.sources", "must be a non-empty list of audio sources")
    if sources[0].get("type", "file") != "file":
        check.fail("recording.sources[0].type",
                   f"only 'file' sources are supported, got {sources[0].get('type')!r}")
    audio = check.string(sources[0], "source", required=True, label="recording.sources[0].source")
    fix = _PREPARE_CUTS.format(file=check.file)
    if recording.get("transforms"):
        transforms = recording["transforms"]
        names = [t.get("name", "?") if isinstance(t, dict) else "?" for t in transforms]
        check.fail("recording.transforms", f"{', '.join(names)} not applied by this reader; "
                   f"write the transformed audio with `{fix}`")

    sups = obj.get("supervisions")
    if not isinstance(sups, list) or not sups or not isinstance(sups[0], dict):
        check.fail("supervisions", "must be a non-empty list of supervision objects")
    if len(sups) > 1:
        check.fail("supervisions", f"{len(sups)} supervisions in one cut (its text would be the "
                   f"first one's for all the audio); split them with `{fix}`")
    sup = sups[0]
    _check_coverage(sup, duration, check, fix)
    custom = sup.get("custom") or {}
    if not isinstance(custom, dict):
        check.fail("supervisions[0].custom", f"must be an object, got {type(custom).__name__}")

    def sup_str(d, name, where):
        return check.string(d, name, label=f"supervisions[0].{where}{name}")

    def label(attribute, value, where):
        if value is None or _is_number(value):  # numeric ages: generate_targets maps them
            return value
        try:
            return labels.normalise(attribute, value)
        except labels.LabelError as e:
            check.fail(f"supervisions[0].{where}", str(e))

    meta = {}
    age_field = "age_group" if custom.get("age_group") is not None else "age"
    age = label("age", custom.get(age_field), f"custom.{age_field}")
    if age is not None:
        meta["age"] = age
    gender_field = "gender" if sup.get("gender") is not None else "custom.gender"
    gender = sup_str(sup, "gender", "") or sup_str(custom, "gender", "custom.")
    gender = label("gender", gender, gender_field)
    if gender is not None:
        meta["gender"] = gender
    emotion = label("emotion", sup_str(custom, "emotion", "custom."), "custom.emotion")
    if emotion is not None:
        meta["emotion"] = emotion
    language = label("language", sup_str(sup, "language", ""), "language")

    response = sup_str(custom, "response", "custom.")
    truncated = response is not None and response.endswith(_LHOTSE_TRUNCATED_TAG)
    if truncated:
        response = response[: -len(_LHOTSE_TRUNCATED_TAG)]
    channel = obj.get("channel")
    n_channels = len(recording.get("channel_ids") or [0])
    return Record(
        id=cut_id,
        audio=resolve_audio(audio, Path.cwd()),
        duration=duration,
        text=sup_str(sup, "text", "") or "",
        language=language,
        offset=start,
        meta=meta,
        instruction=sup_str(custom, "instruction", "custom."),
        input_text=sup_str(custom, "input_text", "custom."),
        response=response,
        truncated=truncated,
        model=sup_str(custom, "from_model", "custom."),
        # a MonoCut names the channel it uses; only meaningful when the file has several
        channel=channel if isinstance(channel, int) and n_channels > 1 else None,
    )


def _check_coverage(sup: dict, duration: float, check: _LineChecker, fix: str) -> None:
    """The supervision must span the cut (within one fbank frame, checks.END_TOLERANCE_SECONDS):
    `lhotse cut simple` on a long recording gives one cut for all of it, whose text is a part."""
    start = check.seconds(sup, "start", label="supervisions[0].start") or 0.0
    length = check.seconds(sup, "duration", label="supervisions[0].duration")
    end = start + (duration if length is None else length)
    tol = checks.END_TOLERANCE_SECONDS
    if start > tol or end < duration - tol:
        check.fail("supervisions[0]", f"covers {start:g}-{end:g} s of a {duration:g} s cut (the "
                   f"rest has no text); trim the cut to it with `{fix}`")


# --------------------------------------------------------------------------------------------------
# Command line: python data.py check manifest.jsonl [more.jsonl.gz ...]
# --------------------------------------------------------------------------------------------------


def check_manifest(path, out=sys.stdout, max_audio_seconds: float | None = None) -> bool:
    """Print a report for one manifest: counts, hours, duration stats, EVERY audio problem
    (missing or unreadable file, offset or offset + duration past its end, too short, over
    `max_audio_seconds`; from the file headers, see checks.audio_problems) and EVERY field error
    (the file is read line by line and keeps going). Returns True when nothing is wrong."""
    print(f"== {path}", file=out)
    if not os.path.exists(path):
        print("  manifest file not found", file=out)
        return False
    records, errors = [], []
    try:
        for _, item in iter_manifest_lines(path):
            (errors if isinstance(item, ManifestError) else records).append(item)
    except (OSError, UnicodeDecodeError, EOFError) as e:  # e.g. a corrupt .gz: report, don't crash
        errors.append(f"{path}: unreadable ({e})")
    problems = checks.audio_problems(records, max_audio_seconds)
    durs = np.array([r.duration for r in records])
    print(f"  utterances: {len(records)}" + ("  (empty manifest)" if not records else ""), file=out)
    if len(durs):
        print(f"  total hours: {durs.sum() / 3600:.4f}", file=out)
        print(f"  duration s: min {durs.min():.2f}  mean {durs.mean():.2f}  max {durs.max():.2f}",
              file=out)
    print(f"  audio problems: {len(problems)}", file=out)
    for p in problems:
        print(f"    {p}", file=out)
    print(f"  field errors: {len(errors)}", file=out)
    for e in errors:
        print(f"    {e}", file=out)
    return not errors and not problems and bool(records)


def main(argv=None) -> list[bool]:
    """`python data.py check m.jsonl ...`: a report per manifest, then OK, or a CheckError naming
    how many have problems. Returns, per manifest, whether it is clean."""
    import argparse

    parser = argparse.ArgumentParser(description="Validate AZeroS manifests.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate manifests: counts, hours, audio, field errors")
    check.add_argument("manifests", nargs="+")
    check.add_argument("--max-audio-seconds", type=float, default=checks.MAX_AUDIO_SECONDS,
                       help="flag rows longer than this (train.py's default limit; 0: no limit)")
    args = parser.parse_args(argv)
    checks.positive_flags(parser, args, non_negative=("max_audio_seconds",))
    ok = [check_manifest(m, max_audio_seconds=args.max_audio_seconds) for m in args.manifests]
    if not all(ok):
        raise checks.CheckError(f"PROBLEMS in {ok.count(False)} of {len(ok)} manifest(s)")
    print("OK")
    return ok


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
