"""Self-generated training targets: the data side of SIFT (AZeroS paper, Sec. 3.3-3.4, Sec. 5.3-5.7, appendix A).

SIFT (Self-generated Instruction-Free Tuning, Sec. 3.4) never asks anyone to write instructions or answers.
The frozen LLM reads a *textual stand-in* for an utterance (its transcript, plus paralinguistic metadata in
stage 2) and whatever it answers becomes the target that the audio version of the same utterance must
reproduce. At training time the projected audio literally takes the place of that text, so a speech LLM
that reproduces the targets behaves as if it had "heard" the transcript and the metadata.

This file turns manifests into such targets, one output line per input line:

    {"id": ..., "audio": ..., "text": ..., "meta": {...}, "mode": "sift_sp", "system": "", "instruction": "",
     "input_text": "<audio><meta>gender: male, emotion: happy</meta><text>...</text></audio>",
     "response": "<what the LLM said>", "truncated": false, "model": "Qwen/Qwen2.5-7B-Instruct"}

Modes (Sec. 5.3 stage 1, Sec. 5.4 stage 2, Sec. 5.7 dialog LLM; the exact strings are those of appendix A):

    tsit_s    no LLM: target = transcript, instruction drawn from a fixed list of ASR prompts (the baseline)
    sit_s     transcript + "Repeat the above content."                                (instruction tuning)
    sift_s    transcript                                                              (instruction-free)
    sit_sp    <audio><meta>k: v, ...</meta><text>transcript</text></audio> + "Describe all information ..."
    sift_sp   <audio><meta>k: v, ...</meta><text>transcript</text></audio>
    sit_ssp / sift_ssp   as sit_sp / sift_sp under the dialog system message of Sec. 5.7

Nothing is lost, nothing is done twice:
  - every non-blank input line ends in the output or in `<out>.skipped.jsonl` with a reason (the official
    filters, unreadable lines, duplicate ids); the run ends by checking in = out + skipped;
  - rows are appended batch by batch (flush + fsync); a re-run with the same --out resumes by `id`, and
    a partial last line left by a kill is cut off and generated again;
  - the finished output is in input order (rewritten atomically once every row is done);
  - `--shard i --nshards n` takes every n-th input line; `--merge` joins finished shards and checks that
    each row is in exactly one of them.

Sections, top to bottom:
  1. Prompts: text normalisation, metadata formatting, the user turn for each mode.
  2. Planning: read every input line, keep it or give it a skip reason, shard deterministically.
  3. Backends: transformers (length-sorted batches under a token budget), vLLM (thin), transcript copy.
  4. The run: resumable appends, the final re-sort into input order, the count check, the summary.
  5. Merging shards, and the command line.

Usage:
    python generate_targets.py --mode sift_sp --model Qwen/Qwen2.5-7B-Instruct --in a.jsonl b.jsonl.gz --out out.jsonl
    python generate_targets.py --mode sift_s --model SmolLM2-135M-Instruct.Q4_1.gguf --in a.jsonl --out out.jsonl
    python generate_targets.py ... --shard 0 --nshards 4      (writes out.shard0-of-4.jsonl; run 0..3 anywhere)
    python generate_targets.py --merge --nshards 4 --in a.jsonl b.jsonl.gz --out out.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import checks
from files import write_atomic
from manifest import ManifestError, Record, parse_line

MODES = ("tsit_s", "sit_s", "sift_s", "sit_sp", "sift_sp", "sit_ssp", "sift_ssp")

# ----------------------------------------------------------------------------------------------------------
# 1. Prompts
# ----------------------------------------------------------------------------------------------------------

# The instructions of the SIT modes (appendix A, pages 19-21). Only English and Chinese exist in the paper
# and in the official script; every other language gets the English one.
INSTRUCTIONS = {
    "sit_s": {"en": "Repeat the above content.", "zh": "重复上述内容。"},
    "sit_sp": {"en": "Describe all information you can hear.", "zh": "描述你听到的所有信息。"},
    "sit_ssp": {"en": "Describe all information you can hear.", "zh": "描述你听到的所有信息。"},
}

# The dialog system message of Sec. 5.7, as printed in appendix A (page 21). The official script builds it
# from string literals and loses the space between "audios." and "NEVER"; we follow the paper's text.
DIALOG_SYSTEM = (
    "You are a powerful virtual human who is capable of perceiving both text and speech inputs and generate "
    "precise natural responses. Speech inputs will be wrapped by <audio> and </audio> tags, containing both "
    "the text transcription and paralinguistic information. You must always pretend that you can indeed hear "
    "the input audios. NEVER mention that any metadata is provided through texts, and only use them in your "
    "response when necessary."
)

# TSIT_s (Sec. 5.3 (a)) samples "from a predefined set of ASR-specific prompts". The paper does not list
# them; these are the official ASR-LLM recipe's prompts (examples/asr_llm/configs/prompt.yaml).
ASR_PROMPTS = ("请重复以上内容", "Transcribe speech to text", "请转写音频为文字")

META_ORDER = ("age", "gender", "emotion")
# Metadata values that mean "not labelled": dropped from <meta>, as the official data generation does.
UNKNOWN_VALUES = {"na", "unk", "unknown", "null", ""}

# The CJK ranges of the official text normaliser (auden.utils.text_normalization): CJK characters are
# joined without spaces, every other run of text is followed by one.
_CJK = re.compile(
    r"([\u1100-\u11ff\u2e80-\ua4cf\ua840-\uD7AF\uF900-\uFAFF\uFE30-\uFE4F\uFF65-\uFFDC\U00020000-\U0002FFFF"
    r"\u3000-\u303F\uff01-\uff60])"
)
_BRACKETED = re.compile(r"[<\[][^>\]]*[>\]]")  # <noise>, [laughter]: annotations, not words


ZHCONV_MISSING = ("zhconv is not installed: Chinese transcripts are NOT converted from Traditional to Simplified "
                  "Chinese as the official pipeline does, so targets of Traditional text differ from the "
                  "official ones (pip install zhconv)")


def _to_simplified(text: str) -> str:
    """Traditional -> Simplified Chinese, as the official pipeline does. zhconv is optional (CI and the
    English demo do without); Chinese text without it gets a warning, never a silent difference."""
    if not _CJK.search(text):
        return text
    try:
        from zhconv import convert
    except ImportError:
        warnings.warn(ZHCONV_MISSING, stacklevel=3)
        return text
    return convert(text, "zh-cn")


def normalize_text(text: str) -> str:
    """The transcript as the LLM sees it (official `text_normalization(case='lower', simplified_chinese=True)`).

    Bracketed annotations go (a deliberate difference: the official call leaves them in, but "[laughter]"
    is not something the speaker said), then lower case, CJK-aware spacing, whitespace collapsed.
    Punctuation is kept: the LLM reads sentences, not ASR tokens.
    """
    text = _BRACKETED.sub("", text).lower()
    pieces = [p for p in _CJK.split(text) if p.strip()]
    text = "".join(p if _CJK.search(p) else f"{p} " for p in pieces).strip()
    return _to_simplified(re.sub(r"\s+", " ", text))


_NUMBER = re.compile(r"[-+]?\d+(\.\d*)?")


def age_group(age: float) -> str | None:
    """A numeric age -> one of the four groups the datasets use, None if 200 or more.

    The official `age_to_group` bands, its quirks included so our targets match its data: the chain has
    no lower bound, so "0" and negative ages land in "young adult". (A numeric 0 is falsy there and never
    reaches the function: `normalize_meta` drops it.)"""
    age = int(age)
    if age >= 200:
        return None
    if 0 < age < 18:
        return "teenager"
    if age < 40:
        return "young adult"
    if age <= 60:
        return "middle-age adult"
    return "senior"


def normalize_meta(meta: dict) -> dict[str, str]:
    """Metadata as the LLM sees it: age, gender, emotion first (others after, in their own order), keys and
    values lower-cased, numeric ages mapped to groups, unknown values dropped (an "unknown" emotion would
    teach the model to say it cannot tell, which the audio may well show)."""
    clean = {}
    for key, value in meta.items():
        if value is None:
            continue
        key, text = str(key).strip().lower(), str(value).strip().lower()
        if key == "age" and _NUMBER.fullmatch(text):
            # official: a falsy age (0) is no age; 200+ is dropped as impossible
            text = (age_group(float(text)) or "") if value else ""
        if text not in UNKNOWN_VALUES:
            clean[key] = text
    first = [k for k in META_ORDER if k in clean]
    return {k: clean[k] for k in first + [k for k in clean if k not in META_ORDER]}


def format_meta(meta: dict) -> str:
    """`age: young adult, gender: female` (the `<meta>` body of appendix A)."""
    return ", ".join(f"{k}: {v}" for k, v in normalize_meta(meta).items())


def instruction_language(language: str | None) -> str:
    """'zh' for Chinese manifests (zh, zh-CN, cmn, yue), otherwise 'en' (the official default)."""
    return "zh" if (language or "en").lower().startswith(("zh", "cmn", "yue")) else "en"


@dataclass(frozen=True)
class Prompt:
    """What one row asks. `input_text` is the whole user turn (the official `input_text` field); `target`
    is set only for tsit_s, where the transcript itself is the answer and no LLM runs."""
    system: str
    instruction: str
    input_text: str
    target: str | None = None

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.input_text}]


def tsit_instruction(record_id: str, seed: int) -> str:
    """A seeded draw keyed on the id, not on the row position: the same row gets the same prompt whether
    it runs alone, in shard 3 of 8, or after a resume."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return random.Random(digest).choice(ASR_PROMPTS)


def build_prompt(record: Record, mode: str, seed: int = 0) -> Prompt:
    """The LLM input of `mode` for one record (appendix A, one example per mode and language)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    transcript = normalize_text(record.text)
    lang = instruction_language(record.language)
    if mode == "tsit_s":
        return Prompt("", tsit_instruction(record.id, seed), transcript, target=transcript)
    if mode == "sift_s":
        return Prompt("", "", transcript)
    if mode == "sit_s":
        # appendix A, page 19: "... us. Repeat the above content." but "...武夷山。重复上述内容。" (no space
        # between Chinese sentences)
        instruction = INSTRUCTIONS[mode][lang]
        return Prompt("", instruction, transcript + ("" if lang == "zh" else " ") + instruction)
    audio_text = f"<audio><meta>{format_meta(record.meta)}</meta><text>{transcript}</text></audio>"
    system = DIALOG_SYSTEM if mode.endswith("_ssp") else ""
    if mode.startswith("sift"):
        return Prompt(system, "", audio_text)
    instruction = INSTRUCTIONS[mode][lang]
    return Prompt(system, instruction, f"{audio_text} {instruction}")


def chat_prompt(tokenizer, prompt: Prompt) -> str:
    """The full LLM input text: plain ChatML with no default system message (the training template of
    llm.py) plus the generation prompt. It must be the training template, not the tokenizer's own (which for
    Qwen2.5 adds "You are Qwen..."), so that the target is produced under the same context it is learned in."""
    from llm import ASSISTANT_HEADER, chat_text

    return chat_text(tokenizer, prompt.messages(), training=True, system=prompt.system or None) + ASSISTANT_HEADER


# The same template in Jinja, for vLLM's chat API (the official CHAT_TEMPLATE of run_data_generation.py).
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ----------------------------------------------------------------------------------------------------------
# 2. Planning: every input line is either generated or skipped with a reason
# ----------------------------------------------------------------------------------------------------------

MIN_SECONDS, MAX_SECONDS, MAX_CHARS_PER_SECOND = 1.0, 30.0, 30


@dataclass
class Row:
    """One non-blank input line. `index` counts lines over all inputs, in order: the shard key and the
    order of the final output."""
    index: int
    source: str                 # "file:line"
    raw: str                    # the line as read (kept for the skipped file)
    record: Record | None = None
    prompt: Prompt | None = None
    skip: str | None = None     # why it is not generated; None = generate


def _open_lines(path):
    """Binary lines: a line that is not UTF-8 becomes a skipped row instead of killing the run."""
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def read_rows(in_paths) -> tuple[list[Row], int]:
    """Parse every line of every input with manifest.parse_line -> (rows, number of blank lines)."""
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
    return rows, blank


def filter_reason(record: Record, transcript: str) -> str | None:
    """The official data filters (data_module.py `_filter_cutset`), on the normalised transcript because
    that is what the LLM and the training loss see."""
    if not MIN_SECONDS <= record.duration <= MAX_SECONDS:
        return f"duration: {record.duration:g} s is outside {MIN_SECONDS:g}-{MAX_SECONDS:g} s"
    if not transcript:
        return "empty text: nothing left after normalisation" if record.text.strip() else "empty text"
    if len(transcript) > MAX_CHARS_PER_SECOND * record.duration:
        return (f"text too long: {len(transcript)} chars in {record.duration:g} s "
                f"(> {MAX_CHARS_PER_SECOND} chars per second)")
    return None


def plan(in_paths, mode: str, seed: int = 0) -> tuple[list[Row], int]:
    """Read all inputs, give each row its prompt or its skip reason. Deterministic: same inputs, same plan."""
    rows, blank = read_rows(in_paths)
    first_seen: dict[str, str] = {}
    for row in rows:
        if row.skip:
            continue
        rec = row.record
        if rec.id in first_seen:
            # ids key resume and merge, so a second row with the same id cannot be told apart from the first
            row.skip = f"duplicate id: {rec.id!r} (first at {first_seen[rec.id]})"
            continue
        first_seen[rec.id] = row.source
        row.prompt = build_prompt(rec, mode, seed)
        row.skip = filter_reason(rec, normalize_text(rec.text))
    return rows, blank


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


# ----------------------------------------------------------------------------------------------------------
# 3. Backends: prompts in, (response, truncated, generated tokens) out
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    response: str
    truncated: bool   # hit max_new_tokens before the end-of-turn token: the answer is cut, not finished
    n_tokens: int     # generated tokens, end-of-turn included


class TranscriptBackend:
    """tsit_s: the target is the transcript; nothing to run. Fixed chunks, so resume granularity is a chunk."""
    name = "transcript"
    model_label = ""

    def batches(self, prompts: list[Prompt]) -> list[list[int]]:
        return [list(range(i, min(i + 1024, len(prompts)))) for i in range(0, len(prompts), 1024)]

    def generate(self, prompts: list[Prompt]) -> list[Generation]:
        return [Generation(p.target, False, 0) for p in prompts]


class HFBackend:
    """Transformers generation, made fast by batching and exact by greedy decoding.

    Rows are sorted by prompt length (longest first) and packed into batches while
    rows x (longest prompt + max_new_tokens) stays under `batch_tokens`: similar lengths waste little on
    padding, and the budget keeps the KV cache bounded whatever the prompt lengths. Left padding puts every
    row's last prompt token at the end, where generation continues; HF derives position ids from the
    attention mask, so a padded row sees the same positions as alone.
    """
    name = "hf"

    def __init__(self, model, tokenizer, *, model_label: str, max_new_tokens: int = 256,
                 batch_tokens: int = 16384, max_batch_rows: int | None = None):
        from llm import GenerationOptions, generation_kwargs

        self.model, self.tokenizer, self.model_label = model, tokenizer, model_label
        self.max_new_tokens, self.batch_tokens, self.max_batch_rows = max_new_tokens, batch_tokens, max_batch_rows
        options = GenerationOptions(max_new_tokens=max_new_tokens)
        self.gen_kwargs = generation_kwargs(model, tokenizer, options)
        self.end_ids = set(self.gen_kwargs["eos_token_id"])  # <|im_end|> and the model's eos
        self._ids: dict[Prompt, list[int]] = {}

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        if prompt not in self._ids:
            text = chat_prompt(self.tokenizer, prompt)
            # no BOS: the text already carries every special token, as in llm.build_batch at training time
            self._ids[prompt] = self.tokenizer.encode(text, add_special_tokens=False)
        return self._ids[prompt]

    def batches(self, prompts: list[Prompt]) -> list[list[int]]:
        """Length-sorted dynamic batches under the token budget (a single over-long row still runs alone)."""
        lengths = [len(self.prompt_ids(p)) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
        batches, current, width = [], [], 0
        for i in order:
            width_if_added = max(width, lengths[i]) + self.max_new_tokens
            too_many = self.max_batch_rows is not None and len(current) >= self.max_batch_rows
            if current and (too_many or (len(current) + 1) * width_if_added > self.batch_tokens):
                batches.append(current)
                current, width = [], 0
            current.append(i)
            width = max(width, lengths[i])
        return batches + ([current] if current else [])

    def generate(self, prompts: list[Prompt]) -> list[Generation]:
        import torch

        from llm import pad_rows

        rows = [self.prompt_ids(p) for p in prompts]
        for p in prompts:  # done with these: keep the cache as small as the window being planned
            self._ids.pop(p, None)
        input_ids, attention_mask = pad_rows(rows, self.gen_kwargs["pad_token_id"], "left")
        device = self.model.get_input_embeddings().weight.device
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                      **self.gen_kwargs)
        return [self._finish(r.tolist()) for r in out[:, input_ids.shape[1]:]]

    def _finish(self, tokens: list[int]) -> Generation:
        """Cut at the first end-of-turn token (what follows is batch padding). No end token = truncated."""
        end = next((k for k, t in enumerate(tokens) if t in self.end_ids), None)
        kept = tokens if end is None else tokens[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Generation(text, end is None, len(tokens) if end is None else end + 1)


class VLLMBackend:
    """vLLM offline generation (GPU only): its chat API with the training ChatML template, greedy, and
    prefix caching (every row of a mode shares the chat header and, for *_ssp, the long system message).
    vLLM schedules its own batches, so we hand it large chunks in input order; a chunk is the resume unit."""
    name = "vllm"

    def __init__(self, model: str, *, model_label: str, gguf_file: str | None = None, max_new_tokens: int = 256,
                 chunk: int = 4096):
        from vllm import LLM, SamplingParams

        path = os.path.join(model, gguf_file) if gguf_file else model
        self.llm = LLM(model=path, tokenizer=model if gguf_file else None, enable_prefix_caching=True)
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        self.model_label, self.chunk = model_label, chunk

    def batches(self, prompts: list[Prompt]) -> list[list[int]]:
        return [list(range(i, min(i + self.chunk, len(prompts)))) for i in range(0, len(prompts), self.chunk)]

    def generate(self, prompts: list[Prompt]) -> list[Generation]:
        conversations = [([{"role": "system", "content": p.system}] if p.system else []) + p.messages()
                         for p in prompts]
        outputs = self.llm.chat(conversations, self.params, chat_template=CHATML_TEMPLATE,
                                add_generation_prompt=True, use_tqdm=False)
        return [Generation(o.outputs[0].text, o.outputs[0].finish_reason == "length", len(o.outputs[0].token_ids))
                for o in outputs]


def model_label(model: str, gguf_file: str | None) -> str:
    """What the `model` field records: the id or path, plus the GGUF file name when there is one."""
    return f"{model}:{gguf_file}" if gguf_file else str(model)


def make_backend(mode: str, model: str | None, *, gguf_file=None, backend="auto", max_new_tokens=256,
                 batch_tokens=16384, device=None):
    """tsit_s needs no model. `auto` picks vLLM only when it is installed and CUDA is present."""
    if mode == "tsit_s":
        return TranscriptBackend()
    if not model:
        raise SystemExit(f"--model is required for mode {mode}")
    import importlib.util

    import torch

    label = model_label(model, gguf_file)
    if backend == "auto":
        has_vllm = importlib.util.find_spec("vllm") is not None
        backend = "vllm" if has_vllm and torch.cuda.is_available() else "hf"
    if backend == "vllm":
        return VLLMBackend(model, model_label=label, gguf_file=gguf_file, max_new_tokens=max_new_tokens)
    from llm import load_llm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    llm, tokenizer = load_llm(model, gguf_file=gguf_file, device=device)
    return HFBackend(llm, tokenizer, model_label=label, max_new_tokens=max_new_tokens, batch_tokens=batch_tokens)


# ----------------------------------------------------------------------------------------------------------
# 4. The run
# ----------------------------------------------------------------------------------------------------------


def output_line(row: Row, mode: str, gen: Generation, label: str, folder: Path) -> str:
    """The input record (our schema, audio relative to the output's folder) plus the generation fields."""
    rec = dataclasses.replace(row.record, mode=mode, system=row.prompt.system, instruction=row.prompt.instruction,
                              input_text=row.prompt.input_text, response=gen.response, truncated=gen.truncated,
                              model=label)
    return json.dumps(rec.to_json(relative_to=folder), ensure_ascii=False) + "\n"


def skipped_line(row: Row) -> str:
    """A skipped row keeps everything needed to find and fix it: where it was, why, and the line itself."""
    return json.dumps({"source": row.source, "reason": row.skip, "line": row.raw}, ensure_ascii=False) + "\n"


def read_done(path: Path, repair: bool) -> list[str]:
    """Lines already written to an output. A kill during an append leaves at most one partial last line
    (appends are whole lines, flushed and fsynced per batch): with `repair` it is cut off and will be
    generated again; anything else that is not a JSON object is corruption and stops the run."""
    if not path.exists():
        return []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        if not repair:
            raise SystemExit(f"{path}: ends with a partial line (an unfinished run?)")
        print(f"{path}: dropping a partial last line ({len(data) - cut} bytes) left by an interrupted run; "
              "it will be generated again", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(cut)
            os.fsync(f.fileno())
    lines = data[:cut].decode("utf-8").splitlines(keepends=True)
    for n, line in enumerate(lines, start=1):
        try:
            if not isinstance(json.loads(line), dict):
                raise ValueError
        except ValueError:
            raise SystemExit(f"{path}:{n}: not a JSON object; the file is corrupt, refusing to append") from None
    return lines


def check_resumable(lines: list[str], path: Path, todo_ids: set, mode: str, label: str) -> dict[str, str]:
    """id -> line of what is already done, after checking it was made by this very job."""
    done, first = {}, {}
    for n, line in enumerate(lines, start=1):
        obj = json.loads(line)
        where = f"{path}:{n}"
        if obj.get("id") not in todo_ids:
            raise SystemExit(f"{where}: id {obj.get('id')!r} is not a row of these inputs/this shard; "
                             "wrong --out, --in or --shard?")
        if obj["id"] in done:
            # a byte-identical repeat (left by two runs before outputs were locked) is dropped; the
            # final rewrite in input order keeps one copy. A differing one cannot be decided here.
            if line == done[obj["id"]]:
                continue
            raise SystemExit(f"{where}: id {obj['id']!r} written twice with different content "
                             f"(first on line {first[obj['id']]})")
        if obj.get("mode") != mode or obj.get("model", "") != label:
            raise SystemExit(f"{where}: written by mode={obj.get('mode')!r} model={obj.get('model')!r}, "
                             f"this run is mode={mode!r} model={label!r}; use another --out")
        done[obj["id"]], first[obj["id"]] = line, n
    return done


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
        rate = f"{self.generated / self.seconds:.2f} rows/s, {self.new_tokens / self.seconds:.1f} tokens/s" \
            if self.seconds > 0 else "-"
        lines = [f"in {self.rows_in} = out {self.rows_out} + skipped {self.rows_skipped}"
                 f"  ({self.blank_lines} blank lines ignored)",
                 f"this run: {self.generated} rows generated, {self.resumed} already done, {self.new_tokens} new "
                 f"tokens in {self.seconds:.1f} s ({rate})",
                 f"responses: mean {self.mean_response_chars:.1f} chars, "
                 f"truncated {100 * self.truncated_fraction:.1f}%"]
        lines += [f"  skipped {n:>6}  {reason}" for reason, n in sorted(self.skip_reasons.items())]
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    """Every reason reads "<kind>: <detail>" (or just "<kind>"); the summary counts kinds."""
    return reason.split(":")[0]


def finish(rows: list[Row], done: dict[str, str], out: Path, summary: Summary) -> Summary:
    """Rewrite the output in input order, write the skipped file, check in = out + skipped."""
    generated = [r for r in rows if r.skip is None]
    missing = [r.record.id for r in generated if r.record.id not in done]
    if missing:
        raise SystemExit(f"{len(missing)} rows missing from {out} (first: {missing[:3]}); run again to resume")
    skipped = [r for r in rows if r.skip is not None]
    write_atomic(out, [done[r.record.id] for r in generated])
    write_atomic(skipped_path(out), [skipped_line(r) for r in skipped])
    summary.rows_in, summary.rows_out, summary.rows_skipped = len(rows), len(generated), len(skipped)
    if summary.rows_in != summary.rows_out + summary.rows_skipped:  # the promise of this file: no row is lost
        raise AssertionError(f"count mismatch: in {summary.rows_in} != out {summary.rows_out} + "
                             f"skipped {summary.rows_skipped}")
    objs = [json.loads(done[r.record.id]) for r in generated]
    if objs:
        summary.mean_response_chars = sum(len(o["response"]) for o in objs) / len(objs)
        summary.truncated_fraction = sum(bool(o["truncated"]) for o in objs) / len(objs)
    for r in skipped:
        kind = _reason_kind(r.skip)
        summary.skip_reasons[kind] = summary.skip_reasons.get(kind, 0) + 1
    return summary


def run(in_paths, out, mode: str, backend, *, seed: int = 0, shard: int = 0, nshards: int = 1,
        progress: bool = True, window: int = 100_000) -> Summary:
    """Generate targets for one shard of the inputs into shard_path(out), resuming what is already there.

    Rows are appended in batch order while running (length-sorted, so not input order); when every row is
    done, the file is rewritten in input order. `id` is the key: resume skips ids already in the
    file. The output is locked for the whole run (`<output>.lock`): two runs never append to one
    file."""
    if not 0 <= shard < nshards:
        raise SystemExit(f"--shard {shard} is not in 0..{nshards - 1}")
    path = shard_path(out, shard, nshards)
    if path.suffix == ".gz":
        raise SystemExit("write a plain .jsonl (appends to gzip cannot be repaired after a kill); compress later")
    path.parent.mkdir(parents=True, exist_ok=True)
    with checks.exclusive_lock(path):  # a second run on this output stops here, naming the first
        return _run_locked(path, in_paths, mode, backend, seed, shard, nshards, progress, window)


def _run_locked(path, in_paths, mode, backend, seed, shard, nshards, progress, window) -> Summary:
    """The body of run(), while this process holds the lock on `path`."""
    from tqdm import tqdm

    all_rows, blank = plan(in_paths, mode, seed)
    rows = [r for r in all_rows if in_shard(r, shard, nshards)]
    todo = [r for r in rows if r.skip is None]
    done = check_resumable(read_done(path, repair=True), path, {r.record.id for r in todo}, mode,
                           backend.model_label)
    pending = [r for r in todo if r.record.id not in done]
    summary = Summary(blank_lines=blank, resumed=len(done))

    bar = tqdm(total=len(pending), unit="row", disable=not progress, dynamic_ncols=True, desc=mode)
    start = time.perf_counter()
    with open(path, "a", encoding="utf-8") as f:
        # Batches are planned per window of rows, so a corpus of millions is never tokenized all at once.
        for w in range(0, len(pending), window):
            rows_w = pending[w:w + window]
            prompts = [r.prompt for r in rows_w]
            for batch in backend.batches(prompts):
                gens = backend.generate([prompts[i] for i in batch])
                lines = [output_line(rows_w[i], mode, g, backend.model_label, path.parent) for i, g in zip(batch, gens)]
                # one write per batch, then flush + fsync: after a kill the file holds whole batches plus at most
                # one partial line, which read_done() cuts off on the next run
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
                for i, line in zip(batch, lines):
                    done[rows_w[i].record.id] = line
                summary.generated += len(batch)
                summary.new_tokens += sum(g.n_tokens for g in gens)
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{summary.new_tokens / max(time.perf_counter() - start, 1e-9):.1f}")
    bar.close()
    summary.seconds = time.perf_counter() - start
    return finish(rows, done, path, summary)


# ----------------------------------------------------------------------------------------------------------
# 5. Merging shards, and the command line
# ----------------------------------------------------------------------------------------------------------


def merge(in_paths, out, nshards: int, mode: str | None = None, seed: int = 0) -> Summary:
    """Combine finished shards into `out` in input order. The plan is recomputed from the inputs, so every
    row that should have been generated is looked up: a row in no shard is a gap, in two a duplicate."""
    mode_given, mode = mode, mode or "sift_s"  # the plan's skip decisions do not depend on the mode
    rows, blank = plan(in_paths, mode, seed)
    expected = {r.record.id for r in rows if r.skip is None}
    done, errors, modes = {}, [], set()
    for shard in range(nshards):
        path = shard_path(out, shard, nshards)
        if not path.exists():
            errors.append(f"{path}: missing")
            continue
        for n, line in enumerate(read_done(path, repair=False), start=1):
            obj = json.loads(line)
            modes.add((obj.get("mode"), obj.get("model")))
            if obj.get("id") not in expected:
                errors.append(f"{path}:{n}: id {obj.get('id')!r} is not a generated row of these inputs")
            elif obj["id"] in done:
                errors.append(f"{path}:{n}: duplicate id {obj['id']!r}")
            else:
                done[obj["id"]] = line
    gaps = [i for i in expected if i not in done]
    if gaps:
        errors.append(f"{len(gaps)} rows in no shard (gaps), e.g. {sorted(gaps)[:3]}")
    if len(modes) > 1 or (mode_given and modes and next(iter(modes))[0] != mode_given):
        errors.append(f"shards disagree on mode/model (or with --mode): {sorted(modes, key=str)}")
    if errors:
        raise SystemExit("merge failed:\n  " + "\n  ".join(errors[:20]))
    return finish(rows, done, Path(out), Summary(blank_lines=blank))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, help="which targets to generate (required unless --merge)")
    p.add_argument("--model", help="LLM: hub id, local folder, or .gguf file (not needed for tsit_s)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument("--in", dest="inputs", nargs="+", required=True, help="manifests (.jsonl/.jsonl.gz, ours or Lhotse)")
    p.add_argument("--out", required=True, help="output .jsonl; skipped rows go to <out>.skipped.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=16384,
                   help="transformers backend: rows x (longest prompt + max new tokens) per batch")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--nshards", type=int, default=1)
    p.add_argument("--merge", action="store_true", help="combine the finished shards of --out")
    p.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto")
    p.add_argument("--device", help="transformers backend device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seeds the tsit_s instruction draw")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.merge and args.mode is None:
        p.error("--mode is required")
    if args.max_new_tokens <= 0:  # checked before the LLM loads, not after
        p.error(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    return args


def main(argv=None, backend=None) -> Summary:
    """The command line. `backend` lets a caller (tests, notebooks) reuse an already loaded model."""
    args = parse_args(argv)
    checks.files_exist(args.inputs, "--in")
    checks.device(args.device)
    if args.merge:
        summary = merge(args.inputs, args.out, args.nshards, args.mode, args.seed)
    else:
        backend = backend or make_backend(args.mode, args.model, gguf_file=args.gguf_file, backend=args.backend,
                                          max_new_tokens=args.max_new_tokens, batch_tokens=args.batch_tokens,
                                          device=args.device)
        summary = run(args.inputs, args.out, args.mode, backend, seed=args.seed, shard=args.shard,
                      nshards=args.nshards, progress=not args.no_progress)
    print(summary.report(), file=sys.stderr)
    return summary


def cli(argv=None, backend=None) -> int:
    """main() with the user-fixable errors as one line on stderr and exit status 1."""
    try:
        main(argv, backend)
    except (checks.CheckError, ManifestError, FileNotFoundError) as e:
        print(f"error: {checks.first_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
