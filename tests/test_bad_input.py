"""Bad input, second probe (issue 26): judge replies, limits on generation, flag values, and a few
inputs that used to end in a traceback or a silent wrong result. Each case ends in the right
behaviour or one line naming the input and the fix. Everything runs in-process on tiny models."""

import pytest

import infer
import train
from checks import CheckError
from tiny import cached_tiny_release, write_wav


@pytest.fixture(scope="module")
def release():
    return cached_tiny_release()


def one_line_error(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err[len("error: "):].strip()


# -------------------------------------------------------------------------------------------------
# 7. Flags are validated before anything loads: zeros that divided by zero after the first step,
# NaN that passed every `<= 0` test, inf that overflowed the step count


def train_argv(tmp_path, *flags, train_spec="m.jsonl"):
    return ["--stage", "1", "--llm", "llm", "--speech-encoder", "enc", "--train", train_spec,
            "--exp", str(tmp_path / "exp"), *flags]


@pytest.mark.parametrize("flags, message", [
    (["--save-every", "0"], "--save-every must be positive, got 0"),
    (["--log-every", "0"], "--log-every must be positive, got 0"),
    (["--grad-accum", "0"], "--grad-accum must be positive, got 0"),
    (["--max-batch", "0"], "--max-batch must be positive, got 0"),
    (["--lr-batches", "0"], "--lr-batches must be positive, got 0"),
    (["--keep-last", "0"], "--keep-last must be positive, got 0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--epochs", "nan"], "--epochs must be a finite number, got nan"),
    (["--epochs", "inf"], "--epochs must be a finite number, got inf"),
    (["--max-audio-seconds", "nan"], "--max-audio-seconds must be a finite number, got nan"),
    (["--max-audio-seconds", "-1"], "--max-audio-seconds must not be negative, got -1"),
    (["--betas", "0.9", "nan"], "--betas must be two numbers in [0, 1), got 0.9 nan"),
])
def test_training_flags_are_refused_before_loading(tmp_path, flags, message):
    with pytest.raises(CheckError) as e:
        train.parse_args(train_argv(tmp_path, *flags))
    assert str(e.value) == message


@pytest.mark.parametrize("weight", ["-1", "nan", "inf", "0"])
def test_manifest_weight_must_be_positive_and_finite(tmp_path, weight):
    spec = f"m.jsonl:{weight}"
    with pytest.raises(CheckError) as e:
        train.parse_args(train_argv(tmp_path, train_spec=spec))
    assert str(e.value) == (f"--train {spec}: the weight after ':' must be a positive number, got "
                            f"{float(weight):g} (1: once an epoch, 0.5: a random half)")
    assert train.parse_train_spec("a:b/m.jsonl:0.5") == ("a:b/m.jsonl", 0.5)  # ':' in a path


def test_top_p_without_temperature_is_refused(release, capsys):
    assert infer.main(["hi", "--model", str(release), "--top-p", "0.9"]) == 1
    assert one_line_error(capsys.readouterr().err) == (
        "--top-p applies only when sampling: add --temperature T (> 0); without it decoding is "
        "greedy")
    assert infer.main(["hi", "--model", str(release), "--temperature", "nan"]) == 1
    assert one_line_error(capsys.readouterr().err) == (
        "--temperature must be a finite number, got nan")


def test_infer_max_audio_seconds_nan_does_not_lift_the_limit(release, tmp_path, capsys):
    wav = write_wav(tmp_path / "a.wav", 0.5)
    assert infer.main([str(wav), "hi", "--model", str(release), "--max-audio-seconds", "nan"]) == 1
    assert one_line_error(capsys.readouterr().err) == (
        "--max-audio-seconds must be a finite number, got nan")
