"""infer.py: the command line end to end (subprocess) and its one-line errors."""

import shutil
import subprocess
import sys

import pytest

import infer
from conftest import ROOT
from tiny import cached_tiny_release, write_wav


@pytest.fixture(scope="module")
def release():
    return cached_tiny_release()


def cli(*args, timeout=600):  # a hang guard only: a loaded 2-core machine can take minutes
    return subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_cli_end_to_end_streams_answer(release, tmp_path):
    wav = write_wav(tmp_path / "x.wav", 1.5)
    run = cli(
        wav, "Describe the audio.", "--model", release, "--max-new-tokens", 8, "--device", "cpu"
    )  # speed is measured in bench/, not asserted here; cli's timeout only catches a hang
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "Traceback" not in run.stderr


def test_cli_missing_file_is_one_line_error(release, tmp_path):
    run = cli(tmp_path / "nope.wav", "hi", "--model", release)
    assert run.returncode == 1
    assert run.stderr.strip() == f"error: audio file not found: {tmp_path / 'nope.wav'}"


def test_split_inputs():
    assert infer.split_inputs(["a.wav", "b.wav", "hi"]) == (["a.wav", "b.wav"], "hi")
    assert infer.split_inputs(["what is two plus two?"]) == ([], "what is two plus two?")
    assert infer.split_inputs(["a.wav", "b.flac"]) == (["a.wav", "b.flac"], "")


def test_errors_and_modes_in_process(release, tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    assert infer.cli([str(bad), "hi", "--model", str(release)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "bad.wav" in err

    incomplete = tmp_path / "incomplete"
    shutil.copytree(release, incomplete)
    shutil.rmtree(incomplete / "llm")
    wav = write_wav(tmp_path / "x.wav", 1.0)
    assert infer.cli([str(wav), "hi", "--model", str(incomplete)]) == 1
    assert (
        capsys.readouterr().err
        == f"error: model folder incomplete: {incomplete / 'llm'} is missing\n"
    )

    # two files: one batched call, one "path<TAB>answer" line each
    wav2 = write_wav(tmp_path / "y.wav", 0.7, seed=1)
    assert (
        infer.cli(
            [str(wav), str(wav2), "Describe.", "--model", str(release), "--max-new-tokens", "4"]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(wav), str(wav2)]

    # no audio: a text question for the frozen LLM
    assert (
        infer.cli(
            ["hello", "--model", str(release), "--max-new-tokens", "4", "--system", "Be brief."]
        )
        == 0
    )
    assert capsys.readouterr().out.endswith("\n")


def test_defaults_are_the_official_generation_config():
    """Greedy, at most 200 new tokens: the official generate_config (examples/azeros README and
    evaluate.py)."""
    args = infer.parse_args(["a.wav", "Describe the audio."])
    assert args.max_new_tokens == 200 and args.temperature is None
