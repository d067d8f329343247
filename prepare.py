"""Data preparation: the paper's corpora (Sec. 5.1, Table 2) -> our JSONL manifests.

Corpora that Lhotse has a recipe for (LibriSpeech, GigaSpeech, WenetSpeech, CommonVoice, AISHELL-1,
VoxCeleb2, DailyTalk, ...) go through that recipe; we only turn its recordings and supervisions into
manifest rows: one row per supervision (long recordings are trimmed to their supervisions, as the
official manifests are), labels in the official vocabulary (support/labels.py), audio that Lhotse
transforms (speed perturbation) written out through Lhotse. The corpora Lhotse lacks (the emotion
corpora, CS-Dialogue) get a small reader each, written from their documented layouts (file-name
conventions, index files). Corpora without transcripts get ASR pseudo-transcripts (`transcribe`),
marked as such.

    lhotse prepare librispeech /data/LibriSpeech data/lhotse          # Lhotse's own recipe
    python prepare.py lhotse data/lhotse/librispeech_recordings_train-clean-100.jsonl.gz \\
        data/lhotse/librispeech_supervisions_train-clean-100.jsonl.gz data/librispeech_100.jsonl
    python prepare.py cuts cuts.jsonl.gz data/cuts.jsonl               # any Lhotse CutSet
    python prepare.py lhotse REC SUP data/aishell.jsonl \\
        --speaker-genders /data/aishell/resource_aishell/speaker.info   # genders Lhotse leaves out
    python prepare.py crema-d /data/CREMA-D data/crema.jsonl  # or ravdess, ..., cs-dialogue
    python prepare.py transcribe data/voxceleb2.jsonl data/voxceleb2_asr.jsonl --whisper DIR

Needs Lhotse (`pip install -r requirements-data.txt`) for `lhotse` and `cuts` only.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

from support import checks, labels
from support.manifest import Record, read_manifest, write_manifest

# CREMA-D (github.com/CheyneyComputerScience/CREMA-D, README): 1079_WSI_SAD_XX.wav is
# actor_sentence_emotion_intensity; the twelve sentences are fixed, so the text is known.
CREMA_SENTENCES = {
    "IEO": "It's eleven o'clock.", "TIE": "That is exactly what happened.",
    "IOM": "I'm on my way to the meeting.", "IWW": "I wonder what this is about.",
    "TAI": "The airplane is almost full.", "MTI": "Maybe tomorrow it will be cold.",
    "IWL": "I would like a new alarm clock.", "ITH": "I think I have a doctor's appointment.",
    "DFA": "Don't forget a jacket.", "ITS": "I think I've seen this before.",
    "TSI": "The surface is slick.", "WSI": "We'll stop in a couple of minutes.",
}
# RAVDESS (zenodo.org/records/1188976): 03-01-06-01-02-01-12.wav is modality-channel-emotion-
# intensity-statement-repetition-actor; odd actors are male, even female.
RAVDESS_EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry",
                    "06": "fearful", "07": "disgust", "08": "surprised"}
RAVDESS_STATEMENTS = {"01": "Kids are talking by the door.", "02": "Dogs are sitting by the door."}
# TESS (Toronto emotional speech set): OAF_back_angry.wav, "Say the word back" spoken by the
# older (64) or the younger (26) actress.
TESS_AGES = {"OAF": 64, "YAF": 26}
# IEMOCAP: SessionN/dialog/EmoEvaluation/<dialog>.txt lines "[start - end]\tutt\temo\t[v, a, d]";
# the speaker's gender is the letter before the utterance number (Ses01F_impro01_M013: male).
IEMOCAP_LINE = re.compile(r"^\[[\d.]+ - [\d.]+\]\t(\S+)\t(\S+)\t")
# EmotionTalk (dataset card, huggingface.co/datasets/BAAI/Emotiontalk; github.com/NKU-HLT/
# EmotionTalk): the audio modality's JSON annotations carry emotion_result, speaker_id,
# file_name (the wav's path) and content (the transcription); the speech is Chinese. The card
# does not say what file_name is relative to. Auden's examples/azeros/configs/README.md shows the
# audio as Audio/wav/G00001/G00001_02/G00001_02_01/G00001_02_01_002.wav: we look for file_name
# under the corpus folder, then under Audio/wav, then as a name in its folder of that tree, and
# fail naming all three if none holds it.
EMOTIONTALK_FIELDS = ("emotion_result", "speaker_id", "file_name", "content")
# CS-Dialogue (huggingface.co/datasets/BAAI/CS-Dialogue, arXiv 2502.18913; the layout Auden's
# examples/azeros/configs/README.md shows): under data/, a Kaldi-style index
# index/short_wav/<split>/{text,wav.scp} (wav.scp paths relative to data/, e.g.
# short_wav/WAVE/C0/ZH-CN_U0001_S0/ZH-CN_U0001_S0_2.wav once the short_wav archive is extracted)
# and every utterance's speaker in index/total_information/Information_Index.txt, tab-separated
# under a header of which we read CS_DIALOGUE_COLUMNS. A transcript may open with the utterance's
# language tag, <CN>, <EN> or <MIX> (code-switched), the TAG column's value.
CS_DIALOGUE_INFO = Path("index", "total_information", "Information_Index.txt")
CS_DIALOGUE_COLUMNS = ("WAVE ID", "Gender", "Age")
CS_DIALOGUE_TAG = re.compile(r"^\s*<(CN|EN|MIX)>\s*")


# --------------------------------------------------------------------------------------------------
# Through Lhotse: recordings + supervisions (or a CutSet) -> rows


def from_lhotse(cuts, audio_dir: Path, genders: dict[str, str | None] | None = None
                ) -> list[Record]:
    """A Lhotse CutSet -> one Record per supervision. Cuts are trimmed to their supervisions (a
    long recording with many segments becomes many rows, each with its own text; a supervision on
    one channel of a multi-channel file keeps that channel); a cut whose recording Lhotse
    transforms is loaded through Lhotse and written to `audio_dir`. `genders` (speaker_genders)
    gives the gender of supervisions whose corpus keeps it beside the recipe's output."""
    import soundfile as sf

    records = []
    for cut in cuts.trim_to_supervisions(keep_overlapping=False):
        sup = cut.supervisions[0]
        custom = sup.custom or {}
        where = f"{cut.id}: "
        gender = sup.gender or custom.get("gender")
        if gender is None and genders is not None:
            gender = speaker_gender(genders, sup.speaker, where)
        age = custom.get("age_group")  # the official cuts hold both; age is in years
        try:
            meta = labels.meta(gender=gender, age=custom.get("age") if age is None else age,
                               emotion=custom.get("emotion"))
            language = labels.normalise("language", sup.language)
        except labels.LabelError as e:
            raise checks.CheckError(where + str(e)) from e
        if cut.recording.transforms:  # e.g. perturb_speed: only Lhotse knows how to apply them
            audio_dir.mkdir(parents=True, exist_ok=True)
            path = audio_dir / f"{cut.id}.wav"
            sf.write(path, cut.load_audio().mean(axis=0), cut.sampling_rate)
            audio, offset, channel = str(path.resolve()), 0.0, None
        else:
            source = cut.recording.sources[0]
            if source.type != "file":
                raise checks.CheckError(f"{where}only file sources can be read, got "
                                        f"{source.type!r}")
            audio, offset = str(Path(source.source).resolve()), cut.start
            # a MonoCut of a stereo call is one side: averaging the two would mix the speakers
            several = len(cut.recording.channel_ids) > 1
            channel = cut.channel if several and isinstance(cut.channel, int) else None
        records.append(Record(id=cut.id, audio=audio, duration=round(cut.duration, 4),
                              text=(sup.text or "").strip(), language=language,
                              offset=round(offset, 4), meta=meta, channel=channel))
    return records


def speaker_genders(path: Path) -> dict[str, str | None]:
    """Lines "<speaker> <gender>" (Kaldi's spk2gender, AISHELL-1's resource_aishell/speaker.info:
    the one stage-2 corpus whose Lhotse recipe leaves the corpus's genders out) -> {speaker:
    gender in the official vocabulary}."""
    checks.files_exist([path], "--speaker-genders")
    genders: dict[str, str | None] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or fields[0] in genders:
            what = "no gender" if len(fields) < 2 else f"{fields[0]} again"
            raise checks.CheckError(f"{path}:{lineno}: {what}")
        try:
            genders[fields[0]] = labels.normalise("gender", fields[1])
        except labels.LabelError as e:
            raise checks.CheckError(f"{path}:{lineno}: {e}") from None
    return genders


def speaker_gender(genders: dict, speaker: str | None, where: str) -> str | None:
    """The speaker's line; AISHELL's speaker.info writes 0002 for the speaker Lhotse calls S0002,
    so a speaker not found as it is is looked up without its leading letters too."""
    for key in (speaker or "", re.sub(r"^\D+", "", speaker or "")):
        if key in genders:
            return genders[key]
    raise checks.CheckError(f"{where}speaker {speaker!r} has no line in --speaker-genders")


def lhotse_manifests(recordings, supervisions):
    from lhotse import CutSet, load_manifest

    return CutSet.from_manifests(recordings=load_manifest(recordings),
                                 supervisions=load_manifest(supervisions))


def lhotse_cuts(path):
    from lhotse import CutSet

    return CutSet.from_file(path)


# --------------------------------------------------------------------------------------------------
# Readers for the emotion corpora Lhotse lacks (each from its documented layout)


def wav_files(root: Path, pattern: str = "*.wav") -> list[Path]:
    files = sorted(root.rglob(pattern))
    if not files:
        raise checks.CheckError(f"{root}: no {pattern} files found (is it the corpus folder?)")
    return files


def row(path: Path, corpus: str, text: str = "", language: str = "en", **meta) -> Record:
    return Record(id=f"{corpus}_{path.stem}", audio=str(path.resolve()),
                  duration=round(checks.audio_seconds(path), 4), text=text, language=language,
                  meta=labels.meta(**meta))


def crema_d(root: Path) -> list[Record]:
    """AudioWAV/<actor>_<sentence>_<emotion>_<intensity>.wav; VideoDemographics.csv gives each
    actor's Age and Sex."""
    demographics = root / "VideoDemographics.csv"
    checks.files_exist([demographics], "CORPUS_DIR (CREMA-D's VideoDemographics.csv)")
    with open(demographics, newline="") as f:
        actors = {r["ActorID"]: r for r in csv.DictReader(f)}
    records = []
    for path in wav_files(root / "AudioWAV"):
        actor, sentence, emotion, _ = _fields(path, 4)
        if actor not in actors or sentence not in CREMA_SENTENCES:
            raise checks.CheckError(f"{path}: unknown actor {actor!r} or sentence {sentence!r}")
        records.append(row(path, "crema", CREMA_SENTENCES[sentence], emotion=emotion,
                           gender=actors[actor]["Sex"], age=int(actors[actor]["Age"])))
    return records


def ravdess(root: Path) -> list[Record]:
    """Actor_NN/03-01-EE-II-SS-RR-NN.wav (audio-only speech files, modality 03, channel 01)."""
    records = []
    for path in wav_files(root, "03-01-*.wav"):
        _, _, emotion, _, statement, _, actor = _fields(path, 7, sep="-")
        if emotion not in RAVDESS_EMOTIONS or statement not in RAVDESS_STATEMENTS:
            raise checks.CheckError(f"{path}: unknown emotion {emotion!r} or statement "
                                    f"{statement!r}")
        records.append(row(path, "ravdess", RAVDESS_STATEMENTS[statement],
                           emotion=RAVDESS_EMOTIONS[emotion],
                           gender="male" if int(actor) % 2 else "female"))
    return records


def tess(root: Path) -> list[Record]:
    """<speaker>_<word>_<emotion>.wav (speaker OAF or YAF, both female)."""
    records = []
    for path in wav_files(root):
        speaker, word, emotion = path.stem.split("_", 2)
        if speaker.upper() not in TESS_AGES:
            raise checks.CheckError(f"{path}: unknown speaker {speaker!r} (OAF or YAF)")
        records.append(row(path, "tess", f"Say the word {word}.", emotion=emotion,
                           gender="female", age=TESS_AGES[speaker.upper()]))
    return records


def iemocap(root: Path) -> list[Record]:
    """SessionN/sentences/wav/<dialog>/<utt>.wav, labels from SessionN/dialog/EmoEvaluation,
    text from SessionN/dialog/transcriptions/<dialog>.txt ("<utt> [start-end]: text")."""
    records = []
    for evaluation in sorted(root.glob("Session*/dialog/EmoEvaluation/*.txt")):
        session, dialog = evaluation.parents[2], evaluation.stem
        texts = {}
        transcript = session / "dialog" / "transcriptions" / f"{dialog}.txt"
        if transcript.is_file():
            for line in transcript.read_text(errors="replace").splitlines():
                utt, _, text = line.partition(":")
                texts[utt.split(" ")[0]] = text.strip()
        for line in evaluation.read_text(errors="replace").splitlines():
            match = IEMOCAP_LINE.match(line)
            if not match:
                continue
            utt, emotion = match.groups()
            path = session / "sentences" / "wav" / dialog / f"{utt}.wav"
            gender = utt.rsplit("_", 1)[1][0]
            records.append(row(path, "iemocap", texts.get(utt, ""), emotion=emotion,
                               gender=gender))
    if not records:
        raise checks.CheckError(f"{root}: no Session*/dialog/EmoEvaluation/*.txt found")
    untold = [r.id for r in records if not r.text]
    if untold:  # the paper transcribes IEMOCAP anyway: `prepare.py transcribe` fills them
        print(f"iemocap: {len(untold)} of {len(records)} rows have no transcription line, text "
              f"left empty: {', '.join(untold[:3])}", file=sys.stderr)
    return records


def meld(root: Path, split: str = "train") -> list[Record]:
    """<split>_sent_emo.csv (Utterance, Emotion, Dialogue_ID, Utterance_ID) and the audio as
    <split>/ or MELD_<split>_wav/ (Auden's name) dia<D>_utt<U>.wav (MELD ships .mp4: convert them
    to wav first, e.g. with ffmpeg). The corpus lacks a few clips (train dia125_utt3 is a corrupt
    mp4, dev dia110_utt7 is missing: github.com/declare-lab/MELD issues 39 and 27), so a row
    without its wav is skipped and counted on stderr rather than stopping the run."""
    table = root / f"{split}_sent_emo.csv"
    checks.files_exist([table], f"CORPUS_DIR (MELD's {split}_sent_emo.csv)")
    folders = [root / split, root / f"MELD_{split}_wav"]
    folder = next((f for f in folders if f.is_dir()), None)
    if folder is None:
        raise checks.CheckError(f"{root}: no folder of wav files, {' or '.join(map(str, folders))}"
                                " (MELD ships mp4: convert them to wav first)")
    records, missing = [], []
    with open(table, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            path = folder / f"dia{r['Dialogue_ID']}_utt{r['Utterance_ID']}.wav"
            if not path.is_file():
                missing.append(path.stem)
                continue
            records.append(row(path, f"meld_{split}", r["Utterance"].strip(),
                               emotion=r["Emotion"]))
    if missing:
        print(f"meld: {len(missing)} of {len(missing) + len(records)} rows of {table.name} have "
              f"no wav in {folder}, skipped: {', '.join(missing[:5])}", file=sys.stderr)
    if not records:
        raise checks.CheckError(f"{folder}: none of the wav files {table.name} lists")
    return records


def emotiontalk(root: Path) -> list[Record]:
    """Audio/**/*.json, each one utterance (or a list of them) with EMOTIONTALK_FIELDS."""
    records = []
    for ann in sorted((root / "Audio").rglob("*.json")):
        items = json.loads(ann.read_text(encoding="utf-8"))
        for item in items if isinstance(items, list) else [items]:
            missing = [k for k in EMOTIONTALK_FIELDS if k not in item]
            if missing:
                raise checks.CheckError(f"{ann}: missing field(s) {', '.join(missing)}")
            path = emotiontalk_audio(root, item["file_name"], ann)
            records.append(row(path, "emotiontalk", item["content"].strip(), language="zh",
                               emotion=item["emotion_result"]))
    if not records:
        raise checks.CheckError(f"{root}: no Audio/**/*.json annotations found")
    return records


def emotiontalk_audio(root: Path, file_name: str, ann: Path) -> Path:
    """The wav of `file_name` (see EMOTIONTALK_FIELDS): G00001_02_01_002.wav's folder in Auden's
    tree is G00001/G00001_02/G00001_02_01, the name's prefixes."""
    parts = Path(file_name).stem.split("_")
    folder = Path(*["_".join(parts[:i]) for i in range(1, len(parts))])
    wav = root / "Audio" / "wav"
    tried = [root / file_name, wav / file_name, wav / folder / Path(file_name).name]
    for path in tried:
        if path.is_file():
            return path
    raise checks.CheckError(f"{ann}: file_name {file_name!r} is not at any of "
                            f"{', '.join(map(str, tried))}")


def cs_dialogue(root: Path) -> list[Record]:
    """index/short_wav/<split>/{text,wav.scp} (every split: the official 103 h are the whole
    corpus), labels from Information_Index.txt. Every row's language is `zh`, as the official
    train_stage2.yaml has it for this corpus: Mandarin dialogues with English switched in, and
    generate_targets picks the instruction's language from the code. The corpus's own tag
    (CN, EN, MIX) is kept as `cs_tag`, and the split as `split`, for whoever wants to filter."""
    if (root / "data" / "index").is_dir():  # the Hugging Face snapshot's top folder
        root = root / "data"
    speakers = _cs_dialogue_speakers(root / CS_DIALOGUE_INFO)
    splits = sorted(scp.parent for scp in (root / "index" / "short_wav").glob("*/wav.scp"))
    if not splits:
        raise checks.CheckError(f"{root}: no index/short_wav/*/wav.scp (is it CS-Dialogue's "
                                "data folder?)")
    records = []
    for split in splits:
        texts = _kaldi_table(split / "text")
        audio = _kaldi_table(split / "wav.scp")
        _report_unpaired(split, texts, audio)
        for utt, (rel, lineno) in audio.items():
            if utt not in texts:
                continue
            if utt not in speakers:
                raise checks.CheckError(f"{root / CS_DIALOGUE_INFO}: no row for {utt}.wav "
                                        f"(listed in {split / 'wav.scp'}:{lineno})")
            path = root / rel
            if not path.is_file():
                raise checks.CheckError(
                    f"{split / 'wav.scp'}:{lineno}: {path}: {checks.missing_audio(path)} (its "
                    f"paths are relative to {root}: extract the short_wav archive so that "
                    f"{root / 'short_wav' / 'WAVE'} exists)")
            text, _ = texts[utt]
            tag = CS_DIALOGUE_TAG.match(text)
            meta = speakers[utt]
            rec = row(path, "cs_dialogue", text[tag.end():].strip() if tag else text.strip(),
                      language="zh", gender=meta["gender"], age=meta["age"])
            cs_tag = tag.group(1) if tag else meta["tag"]
            rec.extra = {**({"cs_tag": cs_tag} if cs_tag else {}), "split": split.name}
            records.append(rec)
    return records


def _cs_dialogue_speakers(path: Path) -> dict[str, dict]:
    """Information_Index.txt -> {utterance id: {gender, age, tag}}, labels already normalised so
    that an unknown one is reported with its line. QUOTE_NONE: a transcript column may hold '"'."""
    checks.files_exist([path], "CORPUS_DIR (CS-Dialogue's index)")
    speakers: dict[str, dict] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in CS_DIALOGUE_COLUMNS if name not in header]
        if missing:
            raise checks.CheckError(f"{path}:1: no column {', '.join(map(repr, missing))} in the "
                                    f"header {header}")
        column = {name: header.index(name) for name in (*CS_DIALOGUE_COLUMNS, "TAG")
                  if name in header}
        for lineno, fields in enumerate(reader, start=2):
            if not any(field.strip() for field in fields):
                continue
            if len(fields) < len(header):
                raise checks.CheckError(f"{path}:{lineno}: {len(fields)} fields, the header "
                                        f"has {len(header)}")
            value = {name: fields[i].strip() for name, i in column.items()}
            try:
                info = {"gender": labels.normalise("gender", value["Gender"]),
                        "age": labels.normalise("age", value["Age"]),
                        "tag": value.get("TAG", "").strip("<>")}
            except labels.LabelError as e:
                raise checks.CheckError(f"{path}:{lineno}: {e}") from None
            utt = value["WAVE ID"].removesuffix(".wav")
            if speakers.setdefault(utt, info) != info:
                raise checks.CheckError(f"{path}:{lineno}: {utt} again, with other labels")
    return speakers


def _kaldi_table(path: Path) -> dict[str, tuple[str, int]]:
    """A Kaldi `text` or `wav.scp`: "<id> <value>" a line -> {id: (value, line number)}."""
    checks.files_exist([path], "CORPUS_DIR (CS-Dialogue's index)")
    table: dict[str, tuple[str, int]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        key, *value = line.split(maxsplit=1)  # a space or a tab after the id
        if key in table:
            raise checks.CheckError(f"{path}:{lineno}: {key} again (first on line "
                                    f"{table[key][1]})")
        table[key] = (value[0].strip() if value else "", lineno)
    return table


def _report_unpaired(split: Path, texts: dict, audio: dict) -> None:
    """Utterances with audio but no transcript (or the reverse) cannot become rows: say so."""
    for have, lack, ids in (("wav.scp", "text", sorted(set(audio) - set(texts))),
                            ("text", "wav.scp", sorted(set(texts) - set(audio)))):
        if ids:
            print(f"cs-dialogue: {split}: {len(ids)} id(s) of {have} not in {lack}, skipped "
                  f"(first: {', '.join(ids[:3])})", file=sys.stderr)


def without_empty_audio(records: list[Record]) -> list[Record]:
    """A file with a header and no samples (CREMA-D's 1076_MTI_NEU_XX.wav, CheyneyComputerScience/
    CREMA-D issue 8) is no utterance, and a manifest refuses a duration of 0: skip and count it."""
    empty = [r.audio for r in records if r.duration <= 0]
    if empty:
        print(f"{len(empty)} audio file(s) without samples, skipped: {', '.join(empty[:3])}",
              file=sys.stderr)
    return [r for r in records if r.duration > 0]


def _fields(path: Path, n: int, sep: str = "_") -> list[str]:
    parts = path.stem.split(sep)
    if len(parts) != n:
        raise checks.CheckError(f"{path}: expected {n} {sep!r}-separated fields in the name")
    return parts


READERS = {"crema-d": crema_d, "ravdess": ravdess, "tess": tess, "iemocap": iemocap,
           "meld": meld, "emotiontalk": emotiontalk, "cs-dialogue": cs_dialogue}


# --------------------------------------------------------------------------------------------------
# Pseudo-transcripts: an ASR pass for the corpora without text (paper Sec. 5.1)


def whisper_recogniser(folder, device: str = "cpu"):
    """A local transformers Whisper checkpoint (e.g. recipe/convert_whisper.py's tiny.en) ->
    a function from a 16 kHz waveform to text. Greedy, as a pseudo-label should be repeatable."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    checks.model_files(folder)
    processor = WhisperProcessor.from_pretrained(folder, local_files_only=True,
                                                 trust_remote_code=False)
    model = WhisperForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True,
        trust_remote_code=False).to(device).eval()

    @torch.no_grad()
    def recognise(wave) -> str:
        feats = processor(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features
        ids = model.generate(feats.to(device), do_sample=False, num_beams=1)
        return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()

    return recognise


def transcribe(records: list[Record], recognise, name: str, every: bool = False) -> int:
    """Fill the text of rows that have none (every row with `every`) from `recognise`, and mark
    it: `pseudo_text` names the model, so a reader can tell labels from guesses."""
    import data

    done = 0
    for rec in records:
        if rec.text and not every:
            continue
        wave = data.load_audio(rec.audio, rec.offset, rec.duration, channel=rec.channel)
        rec.text = recognise(wave)
        rec.extra["pseudo_text"] = name
        done += 1
    return done


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("lhotse", help="a Lhotse recipe's recordings + supervisions -> manifest")
    s.add_argument("recordings")
    s.add_argument("supervisions")
    s.add_argument("out")
    s = sub.add_parser("cuts", help="a Lhotse CutSet (any cuts) -> manifest")
    s.add_argument("cuts")
    s.add_argument("out", help="the manifest, or a folder (then <folder>/cuts.jsonl)")
    for name in ("lhotse", "cuts"):
        sub.choices[name].add_argument(
            "--speaker-genders", type=Path, help="'<speaker> <gender>' lines for supervisions "
            "without a gender (AISHELL-1's resource_aishell/speaker.info)")
    for name in READERS:
        s = sub.add_parser(name, help=f"the {name} corpus folder -> manifest")
        s.add_argument("corpus_dir", type=Path)
        s.add_argument("out")
    s = sub.add_parser("transcribe", help="ASR pseudo-transcripts for rows without text")
    s.add_argument("manifest")
    s.add_argument("out")
    s.add_argument("--whisper", required=True, help="a local transformers Whisper folder")
    s.add_argument("--all", action="store_true", help="replace every text (the paper's choice "
                   "for IEMOCAP, CREMA-D, MELD, RAVDESS, TESS and VoxCeleb2)")
    s.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> list[Record]:
    args = parse_args(argv)
    out = Path(args.out)
    if args.command == "cuts" and (out.is_dir() or not out.suffix):
        out = out / "cuts.jsonl"
    audio_dir = out.parent / f"{out.name.split('.')[0]}_audio"
    if args.command in ("lhotse", "cuts"):
        genders = speaker_genders(args.speaker_genders) if args.speaker_genders else None
        cuts = (lhotse_cuts(args.cuts) if args.command == "cuts"
                else lhotse_manifests(args.recordings, args.supervisions))
        records = from_lhotse(cuts, audio_dir, genders)
    elif args.command == "transcribe":
        records = read_manifest(args.manifest)
        recognise = whisper_recogniser(args.whisper, args.device)
        n = transcribe(records, recognise, Path(args.whisper).name, every=args.all)
        print(f"{n} of {len(records)} rows transcribed by {args.whisper}", file=sys.stderr)
    else:
        records = without_empty_audio(READERS[args.command](args.corpus_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(records, out)
    hours = sum(r.duration for r in records) / 3600
    print(f"{out}: {len(records)} rows, {hours:.2f} h", file=sys.stderr)
    return records


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
