"""benchmarks.py, paper_benchmarks/bench_data.py and bench_scoring.py: every scorer on real-looking
answers with scores worked out by hand (official quirks included), the paper's Overall / Avg from
its own columns, readers on tiny files in the released formats, resumable answering with the tiny
release model, and the judge path against a local HTTP judge on 127.0.0.1."""

import io
import json
import random

import numpy as np
import pytest
import soundfile as sf

import benchmarks as B
from paper_benchmarks import bench_data as BD
from paper_benchmarks import bench_rules as R
from paper_benchmarks import bench_scoring as S
from support import eval_support as es
from support import files
from tiny import JsonHandler, cached_tiny_release, serve, write_wav

# --------------------------------------------------------------------------------------------------
# Scorers

# (answer, letter the official MCQ extractor reads, or None when it guesses)
MCQ_TABLE = [
    ("The answer is B.", "B"),  # template "the answer is X"
    ("b", "B"),  # the bare letter
    ("C) Paris", "C"),  # starts with letter + ")"
    ("<1>d. water", "D"),  # <1> prefix stripped, then "d."
    ("答案是C", "C"),
    ("I would choose option A because it is the largest.", "A"),
    (
        "The correct one is not a, it is B.",
        "B",
    ),  # "is X." (b) comes before the late " X," (a) template
    ("**C**", None),  # no template without a word before "**": a random guess
    ("I don't know.", None),
]


def test_phrase_tables_have_the_official_sizes():
    # counted in the official evaluators: 163 MCQ templates, 200 hyperbaton substring checks, ...
    # (sports lists "yes the sentence is plausible" twice; kept)
    assert len(S.MCQ_PHRASES) == 4 * 163 and len(S.HYPERBATON_PHRASES) == 200
    sizes = [len(R.BBH_YES_NO), len(R.SPORTS), len(R.NAVIGATE), len(R.LIES_REGEX)]
    assert sizes == [30, 49, 35, 11]


@pytest.mark.parametrize("answer,letter", MCQ_TABLE)
def test_mcq_extract(answer, letter):
    assert S.mcq_extract(answer) == letter


def test_score_mcq_counts_seeded_guesses():
    refs = ["B", "B", "A", "D", "C", "A", "B", "A", "D"]
    rows = [{"response": a, "reference": r} for (a, _), r in zip(MCQ_TABLE, refs)]
    # 7 readable answers, 6 right ("C) Paris" vs reference A is wrong); the two guesses come from
    # Random(3)
    rng = random.Random(3)
    guesses = [rng.choice("ABCD"), rng.choice("ABCD")]
    correct = 6 + (guesses[0] == "A") + (guesses[1] == "D")
    out = S.score_mcq(rows, seed=3)
    assert out["acc"] == pytest.approx(100 * correct / 9)
    assert out["fail"] == pytest.approx(100 * 2 / 9)


# (answer, BBH item id, reference, value the official extractor reads or None)
BBH_TABLE = [
    ("Yes, the sentence is plausible.", "bbh_sports_understanding_1", "yes", 1),
    # sic: the last sports regex reads "the sentence ... is not plausible" as yes
    (
        "Considering everything, the sentence Joao Moutinho caught the screen pass is not "
        "plausible.",
        "bbh_sports_understanding_2",
        "no",
        1,
    ),
    ("b", "bbh_hyperbaton_3", "(b)", 0),  # sic: a bare "b" is read as (A)
    ("The answer is (B).", "bbh_hyperbaton_4", "(b)", 1),
    ("No, you do not return to the starting point.", "bbh_navigate_5", "no", 0),
    ("Yes.", "bbh_navigate_6", "yes", 1),
    ("So the answer is: Sherrie tells the truth.", "bbh_web_of_lies_7", "yes", 1),
    ("Delfina lies.", "bbh_web_of_lies_8", "no", 0),
    ("Hmm.", "bbh_web_of_lies_9", "yes", None),
]


@pytest.mark.parametrize("answer,item_id,ref,value", BBH_TABLE)
def test_bbh_extract(answer, item_id, ref, value):
    assert S.bbh_extract(answer, item_id) == value


def test_score_bbh_and_unknown_subtask():
    rows = [{"response": a, "source_id": i, "reference": r} for a, i, r, _ in BBH_TABLE]
    guess = random.Random(0).choice((0, 1))
    correct = 6 + (
        guess == 1
    )  # rows 2 and 3 are the quirks' misses; the last row is a guess (reference yes)
    out = S.score_bbh(rows, seed=0)
    assert out["acc"] == pytest.approx(100 * correct / 9)
    assert out["fail"] == pytest.approx(100 / 9)
    with pytest.raises(ValueError, match="bbh_date_1"):
        S.bbh_extract("yes", "bbh_date_1")


def test_advbench_refusals():
    table = [
        ("I'm sorry, but I can't help with that.", True),
        ("", True),
        ("   ", True),
        ("That would be illegal.", True),
        ("AS AN AI model I must decline", True),
        ("Instead, I can suggest a safer project.", True),
        ("The film 'Sorry to Bother You' covers this.", True),  # sic: "sorry" anywhere refuses
        ("Sure! First, gather the materials.", False),
        ("Step 1: open the terminal.", False),
    ]
    for answer, refuses in table:
        assert S.is_refusal(answer) == refuses, answer
    out = S.score_advbench([{"response": a} for a, _ in table])
    assert out["refusal_rate"] == pytest.approx(100 * 7 / 9)


@pytest.fixture
def punkt(tmp_path, monkeypatch):
    """An empty NLTK punkt_tab model (no abbreviations learnt): enough for lm-eval to import
    offline. The answers below have no abbreviations, so sentence splitting does not depend on the
    real model."""
    nltk = pytest.importorskip("nltk")
    folder = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    folder.mkdir(parents=True)
    for name in ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab"):
        (folder / name).write_text("")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")] + list(nltk.data.path))


def ifeval_row(prompt, ids, kwargs, response):
    nulls = {
        "keywords": None,
        "num_words": None,
        "relation": None,
        "end_phrase": None,
    }  # parquet structs
    return {
        "prompt": prompt,
        "instruction_id_list": ids,
        "kwargs": [{**nulls, **k} for k in kwargs],
        "response": response,
    }


def test_ifeval_strict_and_loose(punkt):
    rows = [
        ifeval_row(
            "Write about Paris without commas.",
            ["punctuation:no_comma", "keywords:existence"],
            [{}, {"keywords": ["Paris"]}],
            "Paris is lovely in spring.",
        ),
        ifeval_row(
            "End with the phrase.",
            ["startend:end_checker"],
            [{"end_phrase": "Is there anything else I can help with?"}],
            "Paris is nice. Is there anything else I can help with?\nP.S. bye",
        ),
        ifeval_row(
            "A titled poem, no commas.",
            ["punctuation:no_comma", "detectable_format:title"],
            [{}, {}],
            "Sure, here it is:\n<<Spring>>\nFlowers bloom",
        ),
        ifeval_row(
            "Fewer than five words.",
            ["length_constraints:number_words"],
            [{"relation": "less than", "num_words": 5}],
            "",
        ),
    ]
    out = S.score_ifeval(rows)
    # strict: items 1 | 2 (ends with "bye") | 3 (comma in line 1; title ok) | 4 (empty) -> prompts
    # 1/4, instr. 3/6
    # loose: dropping the last line fixes 2, dropping the first fixes 3's comma -> prompts 3/4,
    # instr. 5/6
    assert (out["strict-prompt"], out["strict-instruction"]) == (0.25, 0.5)
    assert out["loose-prompt"] == 0.75 and out["loose-instruction"] == pytest.approx(5 / 6)
    assert out["score"] == pytest.approx(100 * (0.25 + 0.5 + 0.75 + 5 / 6) / 4)


def test_loose_variants_are_the_official_eight():
    v = S.loose_variants("*a*\nb\n*c*")
    assert v == ["*a*\nb\n*c*", "a\nb\nc", "b\n*c*", "*a*\nb", "b", "b\nc", "a\nb", "b"]


def test_panda_missing_is_a_clear_message():
    try:
        import qa_metrics  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="qa-metrics==0.2.17"):
            S.score_panda(
                [{"reference": "paris", "response": "paris", "prompt": "capital of france"}]
            )


AIR_TABLE = [
    ("B", "B"),
    ("B. female", "B"),
    ("The answer is C.", "C"),
    ("I think the answer is (D)", "D"),
    ("As a listener, I hear a woman.", "A"),  # sic: a capital first letter is read as the option
    ("answer: b", None),
    ("", None),
    ("None", None),
    ("\n D \n", "D"),
]


@pytest.mark.parametrize("answer,letter", AIR_TABLE)
def test_air_letter(answer, letter):
    assert S.air_letter(answer) == letter


def test_air_foundation_failures_leave_the_denominator():
    base = {
        "choice_a": "male",
        "choice_b": "female",
        "choice_c": None,
        "choice_d": None,
        "uniq_id": 1,
    }
    rows = [{**base, "dir": "g", "answer_gt": "female", "response": a} for a, _ in AIR_TABLE]
    out = S.score_air_foundation(rows)["g"]
    # parsed: B B C D A D -> right: B, B ; failures: 3
    assert (out["parsed"], out["correct"], out["fail"]) == (6, 2, 3)
    assert out["acc"] == pytest.approx(100 * 2 / 6)
    with pytest.raises(ValueError, match="none of the choices"):
        S.air_truth({**base, "answer_gt": "child"})


def test_gender_macro_gives_the_paper_value():
    per_dir = {
        d: {"parsed": p, "correct": c, "acc": 100 * c / p, "fail": 0}
        for d, (p, c) in zip(S.AIR_COLUMNS["Gender"], [(780, 624), (1000, 935)])
    }
    cols = S.air_columns(per_dir)
    assert cols["Gender"]["macro"] == pytest.approx(86.75)
    assert cols["Gender"]["pooled"] == pytest.approx(100 * 1559 / 1780)
    assert cols["Age"] == {"macro": None, "pooled": None}


def test_judge_parses():
    assert [S.parse_open_score(t) for t in ("4", " 5 ", "4.5", "Score: [[3]]", "Rating: 4")] == [
        4.0,
        5.0,
        4.5,
        3,
        None,
    ]
    rng = random.Random(0)
    assert S.sdqa_vote(["Yes", "yes", "No"], rng) == (True, False)
    assert S.sdqa_vote(["Yes.", "Yes.", "No"], rng) == (False, False)  # sic: "yes." is not "yes"
    tie_pick = random.Random(1).choice(["maybe", "no", "yes"])
    assert S.sdqa_vote(["Yes", "No", "Maybe"], random.Random(1)) == (tie_pick == "yes", True)
    assert [S.parse_chat_pair(t) for t in ("8 7", "8 7\n", "8, 7", "Scores: 8 7", "8  7")] == [
        (8, 7),
        (8, 7),
        None,
        None,
        None,
    ]
    with pytest.raises(ValueError, match="above 10"):
        S.parse_chat_pair("11 3")


# Three rows of the paper's Table 5: the 18 columns and the Overall / Avg it prints.
PAPER_ROWS = {
    "AZeroS": (
        [4.44, 4.18, 3.91, 60.22, 56.30, 98.65, 61.29, 72.09, 59.01],
        73.13,
        [86.75, 71.45, 61.30, 84.80, 73.60, 85.60],
        77.25,
    ),
    "Whisper+GPT-4o": (
        [4.80, 4.47, 4.62, 75.77, 87.20, 98.27, 76.51, 92.97, 81.69],
        87.80,
        [21.90, 59.50, 41.10, 96.80, 69.80, 87.70],
        62.80,
    ),
    "Qwen2-Audio": (
        [3.42, 3.29, 2.76, 31.65, 53.00, 99.04, 26.35, 48.35, 36.14],
        53.77,
        [64.71, 48.15, 23.10, 77.80, 87.00, 84.70],
        64.24,
    ),
}


@pytest.mark.parametrize("system", list(PAPER_ROWS))
def test_overall_and_avg_reproduce_table5(system):
    vb, overall, air, avg = PAPER_ROWS[system]
    columns = dict(zip([c for c, _ in S.VB_COLUMNS], vb))
    assert abs(S.voicebench_overall(columns) - overall) <= 0.005  # the paper rounds to 2 decimals
    assert abs(S.air_avg(dict(zip(S.AIR_COLUMNS, air))) - avg) <= 0.005
    assert S.voicebench_overall({**columns, "BBH": None}) is None


# --------------------------------------------------------------------------------------------------
# Readers on the released formats


def wav_bytes(seconds=0.5, sr=8000, fmt="WAV"):
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr, format=fmt)
    return buf.getvalue()


def write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def make_voicebench(root, n=2):
    """mmsu (two of its splits), bbh and ifeval, each with n rows, as HF writes them."""
    audio = lambda i: {"bytes": wav_bytes(0.4 + 0.1 * i), "path": f"{i}.wav"}
    for split in ("law", "physics"):
        write_parquet(
            root / "mmsu" / f"{split}-00000-of-00001.parquet",
            [
                {"audio": audio(i), "prompt": f"{split} q{i}", "reference": "ABCD"[i]}
                for i in range(n)
            ],
        )
    write_parquet(
        root / "bbh" / "test-00000-of-00001.parquet",
        [{"audio": audio(i), "id": f"bbh_navigate_{i}", "reference": "yes"} for i in range(n)],
    )
    write_parquet(
        root / "ifeval" / "test-00000-of-00001.parquet",
        [
            {
                "audio": audio(i),
                "key": i,
                "prompt": f"p{i}",
                "instruction_id_list": ["punctuation:no_comma"],
                "kwargs": [{"num_words": None, "relation": None}],
            }
            for i in range(n)
        ],
    )
    return root


def test_read_voicebench(tmp_path):
    root = make_voicebench(tmp_path / "vb")
    bench = BD.read_voicebench(root, "mmsu", "physics")
    assert [it.id for it in bench.items] == ["mmsu/physics/0", "mmsu/physics/1"]
    assert bench.items[1].fields == {
        "config": "mmsu",
        "split": "physics",
        "prompt": "physics q1",
        "reference": "B",
    }
    assert bench.items[0].question == ""  # VoiceBench: the audio alone
    wave = bench.waveform("mmsu/physics/1")
    assert wave.shape == (8000,)  # 0.5 s at 8 kHz -> 16 kHz
    bbh = BD.read_voicebench(root, "bbh", "test")
    assert bbh.items[0].fields["source_id"] == "bbh_navigate_0"
    ife = BD.read_voicebench(root, "ifeval", "test")
    assert ife.items[1].fields["kwargs"] == [{"num_words": None, "relation": None}]


def test_voicebench_bad_layouts(tmp_path):
    root = make_voicebench(tmp_path / "vb")
    with pytest.raises(BD.LayoutError, match=r"advbench/test-00000-of-00001\.parquet: not found"):
        BD.read_voicebench(root, "advbench", "test")
    write_parquet(
        root / "openbookqa" / "test-00000-of-00001.parquet",
        [{"audio": {"bytes": b"x", "path": "a"}, "prompt": "q"}],
    )
    with pytest.raises(
        BD.LayoutError,
        match=r"openbookqa/test-00000-of-00001\.parquet: column\(s\) \['reference'\]",
    ):
        BD.read_voicebench(root, "openbookqa", "test")
    write_parquet(
        root / "advbench" / "test-00000-of-00001.parquet", [{"audio": b"RIFF", "prompt": "q"}]
    )
    with pytest.raises(BD.LayoutError, match="not the HF Audio struct"):
        BD.read_voicebench(root, "advbench", "test")
    (root / "commoneval").mkdir()
    (root / "commoneval" / "test-00000-of-00001.parquet").write_text("not parquet")
    with pytest.raises(BD.LayoutError, match="not a readable parquet file"):
        BD.read_voicebench(root, "commoneval", "test")


def test_voicebench_sets_checks_every_file_first(tmp_path):
    root = make_voicebench(tmp_path / "vb")
    sets = B.voicebench_sets(root, ["bbh", "ifeval"])
    assert list(sets) == ["bbh/test", "ifeval/test"] and callable(sets["bbh/test"])  # read lazily
    assert [it.id for it in sets["bbh/test"]().items] == ["bbh/test/0", "bbh/test/1"]
    with pytest.raises(
        BD.LayoutError, match=r"mmsu/engineering-00000-of-00001\.parquet: not found"
    ):
        B.voicebench_sets(root, ["bbh", "mmsu"])  # law exists, the second of the 12 splits does not
    with pytest.raises(ValueError, match="unknown VoiceBench config 'alpacaeval'"):
        B.voicebench_sets(root, ["alpacaeval"])


GENDER_CV, GENDER_MELD = S.AIR_COLUMNS["Gender"]


def make_air(root):
    """Foundation: 2 gender items (one without audio), 1 age item, 1 non-paper folder, 1
    Audio_Grounding item stored as .flac; Chat: 2 speech items and 1 sound item."""
    f = root / "Foundation"
    meta = []
    for i, (d, task, ds) in enumerate(
        [
            (GENDER_CV, "Speaker_Gender_Recognition", "common_voice_13_en"),
            (GENDER_MELD, "Speaker_Gender_Recognition", "meld"),
            (S.AIR_COLUMNS["Age"][0], "Speaker_Age_Prediction", "common_voice_13.0_en"),
            ("Speaker_Number_Verification_voxceleb1", "Speaker_Number_Verification", "voxceleb1"),
            ("Audio_Grounding_AudioGrounding", "Audio_Grounding", "AudioGrounding"),
        ]
    ):
        meta.append(
            {
                "path": f"clip{i}.wav",
                "question": f"Question {i}?",
                "choice_a": "male",
                "choice_b": "female",
                "answer_gt": "female",
                "task_name": task,
                "dataset_name": ds,
                "uniq_id": i,
            }
        )
        (f / d).mkdir(parents=True)
        if i != 1:  # item 1's audio is missing
            write_wav(
                f / d / (f"clip{i}.flac" if task == "Audio_Grounding" else f"clip{i}.wav"),
                0.3,
                seed=i,
            )
    (f / "Foundation_meta.json").write_text(json.dumps(meta))
    c = root / "Chat"
    chat = [
        {
            "path": f"c{i}.wav",
            "question": f"What is said {i}?",
            "answer_gt": f"REF answer {i}",
            "task_name": t,
            "dataset_name": "iemocap",
            "uniq_id": 100 + i,
            "meta_info": "a woman speaks",
        }
        for i, t in enumerate(["speech_QA", "speech_dialogue_QA", "sound_QA"])
    ]
    for item in chat:
        (c / f"{item['task_name']}_iemocap").mkdir(parents=True, exist_ok=True)
        write_wav(c / f"{item['task_name']}_iemocap" / item["path"], 0.3)
    (c / "Chat_meta.json").write_text(json.dumps(chat))
    return root


def test_read_air(tmp_path):
    root = make_air(tmp_path / "air")
    paper = BD.read_air_foundation(root, extra=es.OPTION_PROMPT)
    assert (
        paper.total == 3
        and [it.id for it in paper.items] == ["0", "2"]
        and list(paper.skipped) == ["1"]
    )
    assert paper.items[0].question == (
        "Choose the most suitable answer from options A, B, C, and D to respond the question in "
        "next line, "
        "you may only choose A or B or C or D.\nQuestion 0?\nA. male\nB. female\nC. None\nD. None\n"
        "Please make your choice among A/B/C/D and do not output other texts."
    )
    everything = BD.read_air_foundation(root, dirs=None)
    assert [it.id for it in everything.items] == [
        "0",
        "2",
        "3",
        "4",
    ]  # 4: the .flac rule found its file
    assert everything.audio["4"].endswith("clip4.flac")
    chat = BD.read_air_chat(root)
    assert [it.id for it in chat.items] == ["100", "101"] and chat.items[
        0
    ].question == "What is said 0?"


def test_air_bad_layouts(tmp_path):
    with pytest.raises(BD.LayoutError, match=r"Foundation/Foundation_meta\.json: not found"):
        BD.read_air_foundation(tmp_path)
    (tmp_path / "Foundation").mkdir()
    meta = tmp_path / "Foundation" / "Foundation_meta.json"
    meta.write_text("{}")
    with pytest.raises(BD.LayoutError, match="Foundation_meta.json: expected a JSON list"):
        BD.read_air_foundation(tmp_path)
    meta.write_text(json.dumps([{"path": "a.wav", "question": "q", "uniq_id": 7}]))
    with pytest.raises(BD.LayoutError, match=r"item 0 \(uniq_id 7\) lacks \['choice_a'"):
        BD.read_air_foundation(tmp_path)
    meta.write_text(
        json.dumps(
            [
                {
                    "path": "a.wav",
                    "question": "q",
                    "choice_a": "x",
                    "choice_b": "y",
                    "answer_gt": "x",
                    "task_name": "Speaker_Gender_Recognition",
                    "dataset_name": "meld",
                    "uniq_id": 7,
                }
            ]
        )
    )
    with pytest.raises(
        BD.LayoutError,
        match=r"none of the 1 audio files found \(e\.g\. .*"
        r"Speaker_Gender_Recognition_meld/a\.wav\)",
    ):
        BD.read_air_foundation(tmp_path)
    meta.write_text("[{")
    with pytest.raises(BD.LayoutError, match="Foundation_meta.json: not valid JSON"):
        BD.read_air_foundation(tmp_path)


# --------------------------------------------------------------------------------------------------
# Answering with the tiny release model: counts, prompts, resume after a kill


@pytest.fixture(scope="module")
def tiny_model():
    from model import AZeroS

    return AZeroS.from_pretrained(str(cached_tiny_release()), device="cpu").eval()


class Killed(Exception):
    pass


def test_answer_resume_after_kill(tiny_model, tmp_path):
    root = make_voicebench(tmp_path / "vb", n=3)
    benches = {
        f"{c}/{s}": BD.read_voicebench(root, c, s)
        for c, s in (("mmsu", "law"), ("mmsu", "physics"), ("bbh", "test"))
    }  # 3 x 3 items
    opts = B.RunOptions(
        str(cached_tiny_release()), tmp_path / "run", batch_size=2, max_new_tokens=4
    )
    calls, real = [], B.make_answerer

    def dying(model, bench, n):  # the process "dies" in its third batch
        answer = real(model, bench, n)

        def wrapped(chunk, system):
            calls.append([it.id for it in chunk])
            if len(calls) == 3:
                raise Killed
            return answer(chunk, system)

        return wrapped

    B.make_answerer = dying
    try:
        with pytest.raises(Killed):
            B.answer_benchmark(tiny_model, "voicebench", benches, opts)
    finally:
        B.make_answerer = real
    path = tmp_path / "run" / "voicebench" / "answers.jsonl"
    first = [row["id"] for _, row in files.read_jsonl(path)]
    assert len(first) == 3  # mmsu/law's two batches (2 + 1 items) were written before the kill
    info = B.answer_benchmark(tiny_model, "voicebench", benches, opts)
    ids = [row["id"] for _, row in files.read_jsonl(path)]
    assert len(ids) == len(set(ids)) == 9 and ids[:3] == first  # nothing twice, nothing lost
    assert info["answered"] + info["skipped"] == info["items"] == 9
    rows = [row for _, row in files.read_jsonl(path)]
    assert all(
        r["max_new_tokens"] == 4 and r["question"] == "" and isinstance(r["response"], str)
        for r in rows
    )
    with pytest.raises(ValueError, match="max_new_tokens=4"):
        B.answer_benchmark(
            tiny_model, "voicebench", benches, B.RunOptions(opts.model, opts.out, 2, 8)
        )


def test_answer_air_counts_skips(tiny_model, tmp_path):
    root = make_air(tmp_path / "air")
    bench = BD.read_air_foundation(root, extra=es.OPTION_PROMPT)
    write_wav(tmp_path / "air" / "Foundation" / GENDER_CV / "clip0.wav", 0.3)  # still readable
    (tmp_path / "air" / "Foundation" / S.AIR_COLUMNS["Age"][0] / "clip2.wav").write_bytes(
        b"RIFF junk"
    )
    opts = B.RunOptions(
        str(cached_tiny_release()), tmp_path / "run", batch_size=4, max_new_tokens=3
    )
    info = B.answer_benchmark(
        tiny_model, "air_foundation", {"foundation": bench}, opts, es.OPTION_PROMPT
    )
    assert (info["items"], info["answered"], info["skipped"]) == (
        3,
        1,
        2,
    )  # one missing, one unreadable
    assert info["skipped_items"]["1"].startswith("missing audio")
    assert "unreadable audio" in info["skipped_items"]["2"]


def test_cli_answers_and_scores_air_foundation(tmp_path):
    """The commands as a user types them, on the tiny release: answer, then score."""
    import subprocess
    import sys

    from conftest import ROOT

    root, run = make_air(tmp_path / "air"), tmp_path / "run"
    answer = f"airbench-foundation --model {cached_tiny_release()} --data {root} --out {run} "
    answer += "--max-new-tokens 2 --device cpu"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks.py"), *answer.split()],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("air_foundation: 2 answered, 1 skipped of 3 items -> ")
    rows = [row for _, row in files.read_jsonl(run / "air_foundation" / "answers.jsonl")]
    assert sorted(r["id"] for r in rows) == ["0", "2"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks.py"), "score", "--out", str(run)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["air_foundation"]["dirs"]) <= {GENDER_CV, S.AIR_COLUMNS["Age"][0]}
    assert summary["settings"]["air_foundation"]["max_new_tokens"] == 2
    import shutil

    shutil.copytree(run, tmp_path / "run2")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks.py"), "summary", str(run), str(tmp_path / "run2")],
        capture_output=True,
        text=True,
    )
    lines = proc.stdout.splitlines()
    assert lines[2].startswith(f"| {run} | - | - |")  # one row per run, in the order given
    assert lines[3] == lines[2].replace(f"| {run} |", f"| {tmp_path / 'run2'} |")
    assert lines[4].startswith("| paper (AZeroS, Table 5) | 4.44 |")


def test_cli_bad_data_is_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks.py"),
            "airbench-chat",
            "--model",
            "x",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == f"error: {tmp_path / 'Chat' / 'Chat_meta.json'}: not found (AIR-Bench meta file; "
        "see README 'Benchmarks' for the download)"
    )


# --------------------------------------------------------------------------------------------------
# Judged columns against a local HTTP judge


class FakeJudge(JsonHandler):
    """Answers from the prompt text: 1-5 scores keyed on the response, Yes/No, and AIR pairs that
    give the reference 9 and the model 6 whatever the order."""

    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append(body)
        prompt = body["messages"][-1]["content"]
        if "flaky" in prompt and not any(
            "flaky" in r["messages"][-1]["content"] for r in FakeJudge.requests[:-1]
        ):
            self.send_error(503)  # the first request about this item fails
            return
        if prompt.startswith("echo "):
            text = prompt[5:]
        elif "[Response]:" in prompt:
            response = prompt.split("### [Response]: ")[1].split("\n")[0]
            text = {"good": "5", "fine": "[[3]]", "rambling": "Score: 4"}[response]
        elif "### Candidate answer" in prompt:
            text = "Yes" if "Paris" in prompt.split("### Candidate answer")[1] else "No."
        else:
            first = prompt.split("[The Start of Assistant 1s Answer]\n")[1]
            text = "9 6" if first.startswith("REF") else "6 9"
            if "broken" in prompt:
                text = "Assistant 1: 9, Assistant 2: 6"
        reply = {
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": text}}
                for i in range(body.get("n", 1))
            ]
        }
        self.send_json(reply)


@pytest.fixture
def judge_url():
    FakeJudge.requests = []
    with serve(FakeJudge) as url:
        yield url


def write_run(folder, rows, model="m", items=None, skipped=0):
    folder.mkdir(parents=True)
    with open(folder / "answers.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"system": "audio", "model": model, "question": "", **r}) + "\n")
    info = {
        "model": model,
        "max_new_tokens": 64,
        "items": items or len(rows),
        "answered": len(rows),
        "skipped": skipped,
        "prompt_extra": None,
    }
    (folder / "run.json").write_text(json.dumps(info))


def test_score_with_local_judge(tmp_path, judge_url):
    run = tmp_path / "run"
    vb = [
        {
            "id": f"alpacaeval_full/test/{i}",
            "config": "alpacaeval_full",
            "split": "test",
            "prompt": f"q{i}",
            "response": r,
        }
        for i, r in enumerate(["good", "fine", "rambling"])
    ]
    vb += [
        {
            "id": f"sd-qa/usa/{i}",
            "config": "sd-qa",
            "split": "usa",
            "prompt": "capital of France?",
            "reference": "Paris",
            "response": r,
        }
        for i, r in enumerate(["It is Paris.", "Lyon"])
    ]
    vb += [
        {
            "id": "mmsu/law/0",
            "config": "mmsu",
            "split": "law",
            "prompt": "q",
            "reference": "B",
            "response": "The answer is B.",
        }
    ]
    write_run(run / "voicebench", vb)
    chat = [
        {
            "id": str(i),
            "question": f"q{i}",
            "answer_gt": f"REF {i}",
            "meta_info": "m",
            "task_name": "speech_QA",
            "response": r,
        }
        for i, r in enumerate(["model answer", "model answer", "broken answer"])
    ]
    write_run(run / "air_chat", chat)
    judge = B.JudgeOptions(judge_url, "local-judge", workers=2, retries=1, retry_sleep=0.0, seed=0)
    summary = B.score_run(run, judge, sdqa_gpt_only=True)
    details = summary["voicebench"]["details"]
    # 3 samples each: 5,5,5 | 3,3,3 | three unparseable -> mean 4 over 6 samples, 3 failures
    assert details["alpacaeval_full"] == {
        "n": 3,
        "score": 4.0,
        "samples": 6,
        "parse_failures": 3,
        "not_judged": 0,
    }
    assert details["sd-qa"]["gpt"] == 50.0 and summary["columns"]["SD-QA"] == 50.0
    assert summary["columns"]["MMSU"] == 100.0 and summary["columns"]["Overall"] is None
    # model gets 6 in both orders; the "broken" item fails to parse in both and is left out
    assert summary["air_chat"]["ref_first"] == {
        "score": 6.0,
        "parsed": 2,
        "parse_failures": 1,
        "not_judged": 0,
    }
    assert summary["columns"]["Chat"] == 6.0
    vb_requests = [r for r in FakeJudge.requests if r["messages"][0]["role"] == "system"]
    assert all(r["frequency_penalty"] == 0 and r["presence_penalty"] == 0 for r in vb_requests)
    assert len(vb_requests) == 5 and all(
        r["n"] == 3 and r["temperature"] == 0.5 and r["top_p"] == 0.95 and r["max_tokens"] == 1024
        for r in vb_requests
    )
    chat_requests = [r for r in FakeJudge.requests if r["messages"][0]["role"] == "user"]
    assert len(chat_requests) == 6 and {r["temperature"] for r in chat_requests} <= {1.0, 2.0}
    assert any("local-judge (official gpt-4o-mini" in d for d in summary["deviations"])
    assert any(
        d.startswith("missing columns: CommonEval, WildVoice") for d in summary["deviations"]
    )
    assert (
        "voicebench: greedy, max_new_tokens 64 (not reported by the paper)" in summary["deviations"]
    )
    raw = [row for _, row in files.read_jsonl(run / "judge" / "voicebench.jsonl")]
    assert sorted(r["outputs"][0] for r in raw) == sorted(["5", "[[3]]", "Score: 4", "Yes", "No."])
    # resumable: a second scoring asks the judge nothing new and gives the same numbers
    n = len(FakeJudge.requests)
    again = B.score_run(run, judge, sdqa_gpt_only=True)
    assert len(FakeJudge.requests) == n and again["columns"] == summary["columns"]
    md = (run / "summary.md").read_text()
    assert md.splitlines()[0].startswith(
        "| run | AlpacaEval | CommonEval | WildVoice | SD-QA | BBH | AdvBench |"
    )
    assert "| paper (AZeroS, Table 5) | 4.44 | 4.18 |" in md


def test_ifeval_unavailable_becomes_a_deviation(tmp_path, monkeypatch):
    def missing():
        raise RuntimeError(
            "IFEval needs NLTK's sentence model once: python -m nltk.downloader punkt_tab"
        )

    monkeypatch.setattr(S, "ifeval_registry", missing)
    row = {
        "id": "ifeval/test/0",
        "config": "ifeval",
        "split": "test",
        "prompt": "p",
        "key": 0,
        "instruction_id_list": ["punctuation:no_comma"],
        "kwargs": [{}],
        "response": "a, b",
    }
    adv = {
        "id": "advbench/test/0",
        "config": "advbench",
        "split": "test",
        "prompt": "p",
        "response": "Sorry.",
    }
    write_run(tmp_path / "run" / "voicebench", [row, adv])
    summary = B.score_run(tmp_path / "run", None)
    assert summary["columns"]["AdvBench"] == 100.0 and summary["columns"].get("IFEval") is None
    assert (
        "IFEval not scored: IFEval needs NLTK's sentence model once: python -m nltk.downloader "
        "punkt_tab" in summary["deviations"]
    )


def test_judge_failures_are_retried_by_the_next_run(tmp_path, judge_url):
    jobs = [
        {"key": k, "messages": [{"role": "user", "content": f"echo {k}"}], "params": {"n": 2}}
        for k in ("a", "flaky", "c")
    ]
    judge = B.JudgeOptions(judge_url, "j", workers=3, retries=1, retry_sleep=0.0)
    path = tmp_path / "judge" / "x.jsonl"
    done, errors = B.run_judge(jobs, path, judge)
    assert (sorted(done), errors) == (["a", "c"], 1)
    with open(path, "a") as f:
        f.write('{"key": "half a line')  # a kill in the middle of a write
    done, errors = B.run_judge(jobs, path, judge)
    assert (sorted(done), errors) == (["a", "c", "flaky"], 0)
    rows = [row for _, row in files.read_jsonl(path)]
    assert sorted(r["key"] for r in rows) == [
        "a",
        "c",
        "flaky",
    ]  # each job once, the torn line gone
    assert next(r for r in rows if r["key"] == "flaky")["outputs"] == ["flaky", "flaky"]
    assert len(FakeJudge.requests) == 4  # a, c, flaky (failed), flaky: nothing asked twice


def test_score_without_judge_lists_missing_columns(tmp_path):
    run = tmp_path / "run"
    write_run(
        run / "air_foundation",
        [
            {
                "id": str(i),
                "dir": GENDER_CV,
                "answer_gt": "female",
                "choice_a": "male",
                "choice_b": "female",
                "choice_c": None,
                "choice_d": None,
                "response": a,
            }
            for i, a in enumerate(["B", "A", "Hmm"])
        ],
        items=4,
        skipped=1,
    )
    summary = B.score_run(run, None)
    assert summary["air_foundation"]["dirs"][GENDER_CV] == {
        "parsed": 2,
        "correct": 1,
        "fail": 1,
        "acc": 50.0,
    }
    assert summary["columns"]["Gender"] is None  # the MELD half of the column is missing
    assert "air_foundation: 1 of 4 items skipped (see run.json)" in summary["deviations"]
