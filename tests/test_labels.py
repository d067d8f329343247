"""labels.py: every spelling of TABLE maps to the official vocabulary; anything else is refused."""
import pytest

from support import labels

# Each corpus spelling and what the official manifests hold for it (None: not labelled).
EXPECTED = {
    "gender": {"Female": "female", "F": "female", "woman": "female", "female_feminine": "female",
               "MALE": "male", "m": "male", "man": "male", "male_masculine": "male",
               "intersex": None, "transgender": None, "non-binary": None,
               "do_not_wish_to_say": None, "other": None, "": None, "unknown": None},
    "age": {"teenager": "teenager", "Young Adult": "young adult",
            "middle-age adult": "middle-age adult", "senior": "senior", "teens": "teenager",
            "twenties": "young adult", "thirties": "young adult", "fourties": "middle-age adult",
            "forties": "middle-age adult", "fifties": "middle-age adult", "sixties": "senior",
            "seventies": "senior", "eighties": "senior", "nineties": "senior", 17: "teenager",
            18: "young adult", 39: "young adult", 40: "middle-age adult", 60: "middle-age adult",
            61: "senior", "25": "young adult", 250: None, "na": None},
    "emotion": {"angry": "angry", "ANG": "angry", "anger": "angry", "disgust": "disgust",
                "DIS": "disgust", "disgusted": "disgust", "fear": "fear", "FEA": "fear",
                "fearful": "fear", "happy": "happy", "HAP": "happy", "happiness": "happy",
                "joy": "happy", "neutral": "neutral", "NEU": "neutral", "no emotion": "neutral",
                "sad": "sad", "sadness": "sad", "frustrated": "frustrated", "fru": "frustrated",
                "frustration": "frustrated", "excited": "excited", "exc": "excited",
                "surprised": "surprised", "sur": "surprised", "surprise": "surprised",
                "ps": "surprised", "pleasant_surprise": "surprised",
                "pleasant_surprised": "surprised", "calm": "calm", "other": "other",
                "oth": "other", "xxx": None, "null": None},
    "language": {"English": "en", "Chinese": "zh", "mandarin": "zh", "Japanese": "ja",
                 "korean": "ko", "Russian": "ru", "Vietnamese": "vi", "Indonesian": "id",
                 "French": "fr", "Spanish": "es", "Portuguese": "pt", "German": "de",
                 "Italian": "it", "zh-CN": "zh", "zh-TW": "zh", "cmn": "zh", "en": "en",
                 "ko": "ko"},
}


@pytest.mark.parametrize("attribute", sorted(EXPECTED))
def test_every_spelling_maps_to_the_official_vocabulary(attribute):
    got = {value: labels.normalise(attribute, value) for value in EXPECTED[attribute]}
    assert got == EXPECTED[attribute]


def test_the_table_holds_only_official_values_and_every_entry_is_tested():
    official = {"gender": set(labels.GENDERS), "age": set(labels.AGE_GROUPS),
                "emotion": set(labels.EMOTIONS)}
    for attribute, table in labels.TABLE.items():
        values = {v for v in table.values() if v is not None}
        if attribute in official:
            assert values <= official[attribute]
        else:
            assert all(len(v) == 2 and v.islower() for v in values)  # ISO 639-1 codes
        tested = {str(k).strip().lower() for k in EXPECTED[attribute]}
        assert set(table) <= tested, set(table) - tested


@pytest.mark.parametrize("attribute,value", [("gender", "x"), ("age", "old"),
                                             ("emotion", "bored"), ("language", "Klingon")])
def test_unknown_labels_are_an_error_naming_the_value(attribute, value):
    with pytest.raises(labels.LabelError, match=f"^unknown {attribute} label '{value}' "):
        labels.normalise(attribute, value)


def test_meta_keeps_the_official_order_and_drops_unlabelled():
    assert labels.meta(gender="F", age=33, emotion="xxx") == {"age": "young adult",
                                                              "gender": "female"}
    assert list(labels.meta(gender="m", age="sixties", emotion="ANG")) == ["age", "gender",
                                                                          "emotion"]
