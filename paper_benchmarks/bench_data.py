"""Readers for the benchmark data as users download it (AZeroS paper, Sec. 5.2): VoiceBench parquet
files and AIR-Bench's meta JSON + audio folders, turned into eval_support.Item rows for the answer
loop.

VoiceBench (HF dataset hlt-lab/voicebench), one folder per config:
    DATA/<config>/<split>-00000-of-00001.parquet   audio = {bytes, path}, the encoded file
AIR-Bench (HF dataset qyang1021/AIR-Bench-Dataset):
    DATA/Foundation/Foundation_meta.json + DATA/Foundation/<task_name>_<dataset_name>/<path>
    DATA/Chat/Chat_meta.json             + DATA/Chat/<task_name>_<dataset_name>/<path>
An AIR item whose audio file is missing is skipped and counted, as the official inference script
does; Audio_Grounding items read `<path>` with its extension replaced by "flac" (the official rule).

A layout that is not as expected is one line naming the file and what is wrong (LayoutError).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import data
from paper_benchmarks.bench_scoring import AIR_DIRS, CHAT_SPEECH_TASKS, VOICEBENCH
from support import data_support
from support.checks import CheckError
from support.eval_support import Item

# columns each VoiceBench config must have besides `audio` (what its scorer or judge reads)
VB_FIELDS = {
    "alpacaeval_full": ("prompt",),
    "commoneval": ("prompt",),
    "wildvoice": ("prompt",),
    "sd-qa": ("prompt", "reference"),
    "mmsu": ("prompt", "reference"),
    "openbookqa": ("prompt", "reference"),
    "bbh": ("id", "reference"),
    "ifeval": ("key", "prompt", "instruction_id_list", "kwargs"),
    "advbench": ("prompt",),
}
AIR_FOUNDATION_KEYS = (
    "path",
    "question",
    "choice_a",
    "choice_b",
    "answer_gt",
    "task_name",
    "dataset_name",
    "uniq_id",
)
AIR_CHAT_KEYS = (
    "path",
    "question",
    "answer_gt",
    "task_name",
    "dataset_name",
    "uniq_id",
    "meta_info",
)


AIR_INSTRUCTION = (
    "Choose the most suitable answer from options A, B, C, and D to respond the question "
    "in next line, you may only choose A or B or C or D."
)


class LayoutError(CheckError):
    """Benchmark files not laid out as released; the message names the file."""


@dataclass
class Benchmark:
    """Items ready for the answer loop, how each one's audio is read, and what was skipped (id ->
    why)."""

    items: list[Item]
    audio: dict = field(
        default_factory=dict
    )  # id -> encoded bytes (VoiceBench) or a file path (AIR)
    skipped: dict = field(default_factory=dict)
    total: int = 0  # items in the released files, answered or not

    def waveform(self, item_id: str) -> torch.Tensor:
        """16 kHz mono float waveform of one item."""
        source = self.audio[item_id]
        if isinstance(source, bytes):
            return decode_audio(source, item_id)
        return data.load_audio(source)


def decode_audio(blob: bytes, name: str) -> torch.Tensor:
    """Encoded audio bytes (wav/flac/ogg/mp3 as stored in the parquet) -> 16 kHz mono float32,
    resampled with data.resample (torchaudio's filter; HF datasets resamples with its own, a small
    difference)."""
    import soundfile as sf

    try:
        wave, sr = sf.read(io.BytesIO(blob), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise data.AudioError(name, f"unreadable audio bytes ({e})") from e
    data_support.check_samples(name, wave, 0.0, None)  # empty, NaN/Inf: skipped, not answered
    return data.resample(
        torch.from_numpy(wave.mean(axis=1, dtype=np.float32)), sr, data.SAMPLE_RATE
    )


# --------------------------------------------------------------------------------------------------
# VoiceBench


def parquet_files(root: Path, config: str, split: str) -> list[Path]:
    files = sorted((root / config).glob(f"{split}-*.parquet"))
    if not files:
        raise LayoutError(
            f"{root / config / (split + '-00000-of-00001.parquet')}: not found (VoiceBench config "
            f"{config!r}, split {split!r}; see README 'Benchmarks' for the download)"
        )
    return files


def read_parquet(path: Path, needed: tuple) -> list[dict]:
    """Rows of one parquet file as dicts (audio column kept as encoded bytes)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError("reading VoiceBench needs `pip install pyarrow==26.0.1`") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise LayoutError(
            f"{path}: not a readable parquet file ({type(e).__name__}: {e})"
        ) from None
    missing = [c for c in ("audio", *needed) if c not in table.column_names]
    if missing:
        raise LayoutError(f"{path}: column(s) {missing} missing (has {table.column_names})")
    if table.schema.field("audio").type.num_fields == 0 or "bytes" not in [
        f.name for f in table.schema.field("audio").type
    ]:
        raise LayoutError(f"{path}: column 'audio' is not the HF Audio struct {{bytes, path}}")
    return table.to_pylist()


def read_voicebench(root, config: str, split: str) -> Benchmark:
    """One VoiceBench config/split. Ids are "<config>/<split>/<row>"; the fields the scorer needs
    travel with each answer row (the dataset's own `id`, BBH's subtask, becomes `source_id`)."""
    if config not in VOICEBENCH:
        raise ValueError(f"unknown VoiceBench config {config!r}; one of {sorted(VOICEBENCH)}")
    bench = Benchmark(items=[])
    for path in parquet_files(Path(root), config, split):
        for i, row in enumerate(read_parquet(path, VB_FIELDS[config])):
            blob = (row.get("audio") or {}).get("bytes")
            if not blob:
                raise LayoutError(f"{path}: row {i}: audio has no bytes")
            item_id = f"{config}/{split}/{bench.total}"
            bench.total += 1
            fields = {"config": config, "split": split}
            for name in VB_FIELDS[config]:
                fields["source_id" if name == "id" else name] = row[name]
            if "prompt" in row and "prompt" not in fields:
                fields["prompt"] = row["prompt"]
            record = data.Record(
                id=item_id, audio=f"{path}#{i}", duration=len(blob) / 32000.0, source=f"{path}:{i}"
            )
            bench.items.append(
                Item(item_id, record, "", fields)
            )  # VoiceBench: the audio is the question
            bench.audio[item_id] = blob
    return bench


# --------------------------------------------------------------------------------------------------
# AIR-Bench


def read_meta(path: Path, keys: tuple) -> list[dict]:
    if not path.is_file():
        raise LayoutError(
            f"{path}: not found (AIR-Bench meta file; see README 'Benchmarks' for the download)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(meta, list):
        raise LayoutError(f"{path}: expected a JSON list of items, got {type(meta).__name__}")
    for i, item in enumerate(meta):
        if not isinstance(item, dict):
            raise LayoutError(f"{path}: item {i} is not an object")
        missing = [k for k in keys if k not in item]
        if missing:
            raise LayoutError(f"{path}: item {i} (uniq_id {item.get('uniq_id')}) lacks {missing}")
    return meta


def air_audio_path(folder: Path, item: dict) -> Path:
    path = folder / f"{item['task_name']}_{item['dataset_name']}" / str(item["path"])
    if item["task_name"] == "Audio_Grounding":
        path = path.with_name(path.name[:-3] + "flac")  # official rule: last 3 characters -> flac
    return path


def foundation_prompt(item: dict, extra: str | None) -> str:
    """The official instruction, question and lettered options ("None" where C/D are absent, as the
    official script prints them), then AZeroS's extra line on its own line (position not stated)."""
    options = "\n".join(f"{letter}. {item.get('choice_' + letter.lower())}" for letter in "ABCD")
    text = f"{AIR_INSTRUCTION}\n{item['question']}\n{options}"
    return f"{text}\n{extra}" if extra else text


def _air_items(folder: Path, meta: list[dict], keep, question, fields) -> Benchmark:
    bench = Benchmark(items=[])
    for item in meta:
        if not keep(item):
            continue
        bench.total += 1
        item_id = str(item["uniq_id"])
        if item_id in bench.audio or item_id in bench.skipped:
            raise LayoutError(f"{folder}: uniq_id {item_id!r} occurs twice")
        audio = air_audio_path(folder, item)
        if not audio.is_file():
            bench.skipped[item_id] = f"missing audio {audio}"
            continue
        record = data.Record(id=item_id, audio=str(audio), duration=audio.stat().st_size / 32000.0)
        bench.items.append(Item(item_id, record, question(item), fields(item)))
        bench.audio[item_id] = str(audio)
    if bench.total and not bench.items:  # every file missing: a layout problem, not a few bad clips
        first = next(iter(bench.skipped.values())).removeprefix("missing audio ")
        raise LayoutError(
            f"{folder}: none of the {bench.total} audio files found (e.g. {first}); the "
            "audio folders <task_name>_<dataset_name>/ belong beside the meta file"
        )
    return bench


def read_air_foundation(root, dirs=AIR_DIRS, extra: str | None = None) -> Benchmark:
    """Foundation items of the given folders (default: the paper's 8 speech folders)."""
    folder = Path(root) / "Foundation"
    meta = read_meta(folder / "Foundation_meta.json", AIR_FOUNDATION_KEYS)
    keep = (
        (lambda it: f"{it['task_name']}_{it['dataset_name']}" in dirs)
        if dirs
        else (lambda it: True)
    )
    fields = lambda it: {
        "dir": f"{it['task_name']}_{it['dataset_name']}",
        "answer_gt": it["answer_gt"],
        **{f"choice_{c}": it.get(f"choice_{c}") for c in "abcd"},
    }
    return _air_items(folder, meta, keep, lambda it: foundation_prompt(it, extra), fields)


def read_air_chat(root, tasks=CHAT_SPEECH_TASKS) -> Benchmark:
    """Chat items of the speech category (speech_QA + speech_dialogue_QA) by default."""
    folder = Path(root) / "Chat"
    meta = read_meta(folder / "Chat_meta.json", AIR_CHAT_KEYS)
    keep = (lambda it: it["task_name"] in tasks) if tasks else (lambda it: True)
    fields = lambda it: {
        "task_name": it["task_name"],
        "answer_gt": it["answer_gt"],
        "meta_info": it["meta_info"],
    }
    return _air_items(folder, meta, keep, lambda it: str(it["question"]), fields)
