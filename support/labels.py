"""Support module (not the method): corpus labels -> the official vocabulary, in one table.

The stage-2 corpora (paper Sec. 5.1, Table 2) carry their own gender, age and emotion labels, each
corpus spelled its own way (CommonVoice `male_masculine` and `twenties`, VoxCeleb `f`, DailyTalk
`no emotion`, CREMA-D `ANG`, IEMOCAP `fru`). The official manifests hold them normalised to the
vocabulary of the Auden-Voice classifiers (Auden examples/voice/configs/id2label_*.json):

    gender   female, male
    age      teenager, young adult, middle-age adult, senior
    emotion  angry, disgust, fear, happy, neutral, sad, frustrated, excited, surprised, calm, other

and languages as the ISO 639-1 codes of train_stage1.yaml (en, zh, ja, ...). Every spelling we
know is one line of TABLE below; a label that is not there is a LabelError naming it, never passed
through: a new corpus's spelling is added here, with its test, after a look at what it means.
`None` in the table means "the corpus says: not labelled" (the field is then left out).
"""
from __future__ import annotations

import re

from support.checks import CheckError

GENDERS = ("female", "male")
AGE_GROUPS = ("teenager", "young adult", "middle-age adult", "senior")
EMOTIONS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "frustrated", "excited",
            "surprised", "calm", "other")

# Spellings that mean "no label" in every attribute (normalize_meta drops the same values).
NOT_LABELLED = {"": None, "na": None, "n/a": None, "unk": None, "unknown": None, "null": None,
                "none": None}

TABLE: dict[str, dict[str, str | None]] = {
    "gender": {
        "female": "female", "f": "female", "woman": "female",
        "male": "male", "m": "male", "man": "male",
        # CommonVoice (since v17) spells them with the presentation, and offers answers outside
        # the classifiers' two classes: those stay unlabelled rather than guessed
        "female_feminine": "female", "male_masculine": "male",
        "intersex": None, "transgender": None, "non-binary": None, "do_not_wish_to_say": None,
        "other": None,
    },
    "age": {
        **{group: group for group in AGE_GROUPS},
        # CommonVoice's decades, placed in the official bands (<18, 18-39, 40-60, >60)
        "teens": "teenager", "twenties": "young adult", "thirties": "young adult",
        "fourties": "middle-age adult", "forties": "middle-age adult",
        "fifties": "middle-age adult", "sixties": "senior", "seventies": "senior",
        "eighties": "senior", "nineties": "senior",
    },
    "emotion": {
        **{emotion: emotion for emotion in EMOTIONS},
        # IEMOCAP's codes (xxx: the annotators did not agree), CREMA-D's codes, MELD's and
        # DailyTalk's words, RAVDESS's and TESS's names
        "ang": "angry", "anger": "angry",
        "dis": "disgust", "disgusted": "disgust",
        "fea": "fear", "fearful": "fear",
        "hap": "happy", "happiness": "happy", "joy": "happy",
        "neu": "neutral", "no emotion": "neutral",
        "sadness": "sad",
        "fru": "frustrated", "frustration": "frustrated",
        "exc": "excited",
        "sur": "surprised", "surprise": "surprised", "ps": "surprised",
        "pleasant_surprise": "surprised", "pleasant_surprised": "surprised",
        "oth": "other",
        "xxx": None,
    },
    "language": {
        # names Lhotse's recipes write (supervision.language) -> codes
        "english": "en", "chinese": "zh", "mandarin": "zh", "japanese": "ja", "korean": "ko",
        "russian": "ru", "vietnamese": "vi", "indonesian": "id", "french": "fr", "spanish": "es",
        "portuguese": "pt", "german": "de", "italian": "it",
        # CommonVoice's locale names for Mandarin
        "zh-cn": "zh", "zh-tw": "zh", "cmn": "zh",
    },
}
_ISO_639_1 = re.compile(r"[a-z]{2}")  # a two-letter code is already in the vocabulary


class LabelError(CheckError):
    """A corpus label with no entry in TABLE. The message names the attribute and the value."""


def normalise(attribute: str, value) -> str | None:
    """One label -> its official spelling (None: not labelled). Numbers are ages in years."""
    if value is None:
        return None
    if attribute == "age" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return age_group(value)
    key = str(value).strip().lower()
    if attribute == "age" and re.fullmatch(r"\d+(\.\d*)?", key):
        return age_group(float(key))
    if attribute == "language" and _ISO_639_1.fullmatch(key):
        return key
    table = TABLE[attribute]
    if key in table:
        return table[key]
    if key in NOT_LABELLED:
        return None
    known = ", ".join(sorted({v for v in table.values() if v}))
    raise LabelError(f"unknown {attribute} label {value!r} (the official vocabulary: {known}; "
                     f"add its spelling to labels.TABLE)")


def age_group(age: float) -> str | None:
    """A numeric age -> one of the four groups the datasets use, None if 200 or more.

    The official `age_to_group` bands, quirks included so our targets match its data: the chain has
    no lower bound, so "0" and negative ages land in "young adult". (A numeric 0 is falsy there and
    never reaches the function: normalize_meta below drops it.)"""
    age = int(age)
    if age >= 200:
        return None
    if 0 < age < 18:
        return "teenager"
    if age < 40:
        return "young adult"
    return "middle-age adult" if age <= 60 else "senior"


# Metadata as target generation writes it into `<meta>` (generate_targets.format_meta)
META_ORDER = ("age", "gender", "emotion")
UNKNOWN_VALUES = {"na", "unk", "unknown", "null", ""}  # "not labelled": dropped, as officially
_NUMBER = re.compile(r"[-+]?\d+(\.\d*)?")


def normalize_meta(meta: dict) -> dict[str, str]:
    """Metadata as the LLM sees it: age, gender, emotion first (others after, in their own order),
    keys and values lower-cased, numeric ages mapped to groups, unknown values dropped (an "unknown"
    emotion would teach the model to say it cannot tell, which the audio may well show)."""
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


def meta(gender=None, age=None, emotion=None) -> dict[str, str]:
    """The `meta` object of a manifest row, in the official order, unlabelled fields left out."""
    values = {"age": normalise("age", age), "gender": normalise("gender", gender),
              "emotion": normalise("emotion", emotion)}
    return {k: v for k, v in values.items() if v is not None}
