"""Bad input and faults (issue 16): each case fails with one line naming the file, or recovers,
never silently.

Cheap cases run in-process with tiny random models; the kill and concurrency cases (two generation
runs on one output, a training run killed and its newest checkpoint truncated) are one slow test
with subprocesses.
"""

import errno
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import evaluate
import generate_targets as gt
import infer
import train
from conftest import ROOT
from support import checks, files, train_support
from support.checks import CheckError
from test_train import build_setup, stage1_args, stage2_args
from tiny import cached_tiny_release, write_wav


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("reliab"), with_train16=False)


@pytest.fixture(scope="module")
def release():
    return cached_tiny_release()


def rows(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def row(i, audio, duration, **extra):
    return {
        "id": f"u{i}",
        "audio": str(audio),
        "duration": duration,
        "text": f"utterance {i}",
        "mode": "sift_s",
        "response": "cat",
        "truncated": False,
        **extra,
    }


def one_line_error(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err[len("error: ") :].strip()


# -------------------------------------------------------------------------------------------------
# 1. infer.py: an argument that looks like an audio file but does not exist is an error, not a
# prompt


def test_missing_audio_alone_is_an_error_not_a_prompt(release, tmp_path, capsys):
    missing = tmp_path / "nope.wav"
    assert infer.split_inputs([str(missing)]) == ([str(missing)], "")
    assert infer.cli([str(missing), "--model", str(release)]) == 1
    assert one_line_error(capsys.readouterr().err) == f"audio file not found: {missing}"
    # a prompt that merely ends in a file name is still a prompt
    assert infer.split_inputs(["what is in a.wav"]) == ([], "what is in a.wav")


# -------------------------------------------------------------------------------------------------
# 2. train.py: non-positive budgets; a finished model is never replaced without --overwrite


@pytest.mark.parametrize(
    "flags, name",
    [
        (["--max-steps", "0"], "max-steps"),
        (["--max-steps", "-3"], "max-steps"),
        (["--epochs", "0"], "epochs"),
    ],
)
def test_non_positive_budget_is_refused(setup, tmp_path, flags, name):
    with pytest.raises(CheckError, match=f"^--{name} must be positive, got {flags[1]}$"):
        train.main(stage1_args(setup, tmp_path / "exp", *flags))
    assert not (tmp_path / "exp" / "model.safetensors").exists()


def test_finished_model_is_not_overwritten(setup, tmp_path):
    exp = tmp_path / "exp"
    train.main(stage1_args(setup, exp, "--max-steps", "1", "--max-duration", "1.6"))
    before = (exp / "model.safetensors").read_bytes()
    with pytest.raises(
        CheckError, match="already holds a finished model .* pass --overwrite to replace it"
    ):
        train.main(
            stage1_args(setup, exp, "--max-steps", "1", "--max-duration", "1.6", "--seed", "7")
        )
    assert (exp / "model.safetensors").read_bytes() == before
    train.main(
        stage1_args(
            setup, exp, "--max-steps", "1", "--max-duration", "1.6", "--seed", "7", "--overwrite"
        )
    )
    assert (exp / "model.safetensors").read_bytes() != before


# -------------------------------------------------------------------------------------------------
# 3. train.py: zero supervised tokens is an error naming the manifest, not a loss of 0.0


def test_all_responses_empty_and_truncated_is_refused(setup, tmp_path):
    wav = write_wav(tmp_path / "a.wav", 0.8)
    manifest = rows(
        tmp_path / "empty.jsonl", [row(i, wav, 0.8, response="", truncated=True) for i in range(3)]
    )
    with pytest.raises(
        CheckError, match=f"^training manifest {manifest}: every response is empty and truncated"
    ):
        train.main(stage1_args(setup, tmp_path / "exp", "--max-steps", "2", train=str(manifest)))


def test_batch_without_supervised_tokens_names_its_rows(setup, tmp_path):
    wav = write_wav(tmp_path / "a.wav", 0.8)
    manifest = rows(
        tmp_path / "mixed.jsonl", [row(0, wav, 0.8), row(1, wav, 0.8, response="", truncated=True)]
    )
    with pytest.raises(
        CheckError,
        match=f"a training batch of 1 rows from {manifest} \\(first: {manifest}:2\\) "
        "has no supervised token: every response is empty and truncated",
    ):
        train.main(
            stage1_args(
                setup,
                tmp_path / "exp",
                "--max-steps",
                "2",
                "--max-batch",
                "1",
                "--max-duration",
                "1",
                train=str(manifest),
            )
        )


# -------------------------------------------------------------------------------------------------
# 5. audio over the length limit (default 50 s, overridable) is refused, naming the file


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "long.wav"
    sf.write(path, np.zeros(51 * 16000, dtype=np.int16), 16000)
    return path


def test_long_audio_is_refused_by_infer(release, long_wav, capsys):
    assert infer.cli([str(long_wav), "hi", "--model", str(release)]) == 1
    assert one_line_error(capsys.readouterr().err) == (
        f"{long_wav}: 51.0 s of audio is over the limit of 50 s (the encoders' memory grows "
        "with the square of the length); cut it, or raise --max-audio-seconds"
    )
    assert infer.parse_args([str(long_wav), "--max-audio-seconds", "60"]).max_audio_seconds == 60
    checks.audio_file(long_wav, 60.0)  # the raised limit lets it through


def test_long_audio_is_refused_before_training(setup, long_wav, tmp_path, monkeypatch):
    monkeypatch.setattr(
        train, "build_model", lambda *a: pytest.fail("the model was built before the check")
    )
    manifest = rows(tmp_path / "long.jsonl", [row(0, long_wav, 51.0)])
    with pytest.raises(
        CheckError,
        match=f"^{manifest}:1: field 'duration': 51.0 s of audio is over the limit of 50 s",
    ):
        train.main(stage1_args(setup, tmp_path / "exp", "--max-steps", "1", train=str(manifest)))
    with pytest.raises(CheckError, match="over the limit of 20 s"):
        train.main(
            stage1_args(
                setup,
                tmp_path / "exp",
                "--max-steps",
                "1",
                "--max-audio-seconds",
                "20",
                train=str(manifest),
            )
        )


def test_long_audio_is_refused_by_evaluate(release, long_wav, tmp_path, capsys):
    manifest = rows(tmp_path / "eval.jsonl", [row(0, long_wav, 51.0)])
    assert (
        evaluate.cli(
            [
                "--model",
                str(release),
                "--manifest",
                str(manifest),
                "--task",
                "align",
                "--out",
                str(tmp_path / "out"),
                "--device",
                "cpu",
            ]
        )
        == 1
    )
    assert one_line_error(capsys.readouterr().err).startswith(
        f"{manifest}:1: field 'duration': 51.0 s of audio"
    )


# -------------------------------------------------------------------------------------------------
# 6. audio files and their lengths are checked from the headers before training and by `data.py
# check`


def bad_audio_manifest(tmp_path):
    wav = write_wav(tmp_path / "one.wav", 1.0)
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    path = rows(
        tmp_path / "bad.jsonl",
        [
            row(0, wav, 1.0),
            row(1, tmp_path / "gone.wav", 1.0),
            row(2, tmp_path / "junk.wav", 1.0),
            row(3, wav, 0.5, offset=1.5),  # starts after the end
            row(4, wav, 0.6, offset=0.5),  # ends 0.1 s after the end
            row(5, wav, 0.505, offset=0.5),  # 5 ms over: inside the one-frame tolerance
            row(6, wav, 0.05),  # too short for the encoder
        ],
    )
    return path, wav


def test_audio_problems_name_line_and_field(tmp_path):
    path, wav = bad_audio_manifest(tmp_path)
    problems = checks.audio_problems(data.read_manifest(path))
    assert problems[0] == f"{path}:2: field 'audio': {tmp_path / 'gone.wav'}: audio file not found"
    assert problems[1].startswith(
        f"{path}:3: field 'audio': {tmp_path / 'junk.wav'}: unreadable audio ("
    )
    assert problems[2] == f"{path}:4: field 'offset': 1.5 s is past the end of {wav} (1.000 s)"
    assert (
        problems[3]
        == f"{path}:5: field 'duration': offset 0.5 s + duration 0.6 s ends after {wav} (1.000 s)"
    )
    assert (
        problems[4]
        == f"{path}:7: field 'duration': 0.050 s of audio is shorter than the 0.09 s "
        "the encoder needs"
    )
    assert len(problems) == 5  # row 6 is within the tolerance
    assert all("\n" not in p for p in problems)


def test_data_check_reports_audio_problems(tmp_path):
    path, _ = bad_audio_manifest(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "data.py"), "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "audio problems: 5" in proc.stdout
    assert (
        f"{path}:4: field 'offset'" in proc.stdout and f"{path}:5: field 'duration'" in proc.stdout
    )


def test_bad_audio_is_refused_before_training(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(
        train, "build_model", lambda *a: pytest.fail("the model was built before the check")
    )
    path, _ = bad_audio_manifest(tmp_path)
    with pytest.raises(CheckError) as e:
        train.main(stage1_args(setup, tmp_path / "exp", "--max-steps", "1", train=str(path)))
    assert str(e.value) == (
        f"{path}:2: field 'audio': {tmp_path / 'gone.wav'}: audio file not found "
        f"(and 4 more: `python data.py check {path}` lists them)"
    )


# -------------------------------------------------------------------------------------------------
# 7. corrupt weights or config name the file


@pytest.mark.parametrize("name", ["model.safetensors", "llm/model.safetensors", "config.json"])
def test_corrupt_model_files_are_named(release, tmp_path, capsys, name):
    broken = tmp_path / "broken"
    shutil.copytree(release, broken)
    target = broken / name
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])  # truncated
    wav = write_wav(tmp_path / "x.wav", 1.0)
    assert infer.cli([str(wav), "hi", "--model", str(broken)]) == 1
    message = one_line_error(capsys.readouterr().err)
    assert message.startswith(f"{target}: ") and (
        "corrupt" in message or "not valid JSON" in message
    ), message


# -------------------------------------------------------------------------------------------------
# 8. a truncated newest checkpoint falls back to the one before; a failed checkpoint write cleans up


def test_truncated_checkpoint_falls_back(setup, tmp_path, capsys):
    exp = tmp_path / "exp"
    common = ("--max-duration", "1.6", "--save-every", "1", "--decay-steps", "4")
    train.main(stage1_args(setup, exp, "--max-steps", "3", *common))
    newest = exp / "checkpoints" / "step-00000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    r = train.main(stage1_args(setup, exp, "--max-steps", "4", "--resume", *common))
    out = capsys.readouterr().out
    assert (
        f"note: {newest} is unreadable" in out
        and "resumed from" in out
        and "step-00000002.pt at step 2" in out
    )
    assert r["step"] == 4


def test_failed_checkpoint_write_cleans_up(tmp_path, monkeypatch):
    def disk_full(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckError) as e:
        train_support.save_checkpoint(tmp_path, {"step": 5}, keep_last=2, rank=0)
    assert str(e.value) == (
        f"could not write the checkpoint {tmp_path / 'checkpoints' / 'step-00000005.pt'}: "
        "[Errno 28] No space left on device"
    )
    assert list((tmp_path / "checkpoints").iterdir()) == []


# -------------------------------------------------------------------------------------------------
# 9. what used to be a traceback is one line


def test_stage2_resume_from_stage1_checkpoint(setup, tmp_path):
    exp = tmp_path / "exp"
    train.main(stage1_args(setup, exp / "s1", "--max-steps", "1", "--max-duration", "3.2"))
    shutil.copytree(exp / "s1" / "checkpoints", exp / "s2" / "checkpoints")
    with pytest.raises(
        CheckError, match="step-00000001.pt was written by a stage-1 run; this is stage 2"
    ):
        train.main(stage2_args(setup, exp / "s1", exp / "s2", "--max-steps", "2", "--resume"))


def test_paraling_encoder_pointing_at_an_llm(setup, tmp_path):
    with pytest.raises(
        CheckError,
        match=f"--paraling-encoder {setup['llm']}: config.json describes a 'qwen2' "
        "model, not a Zipformer or Whisper encoder",
    ):
        train.main(stage2_args(setup, tmp_path, tmp_path / "x", paraling=setup["llm"]))


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_without_cuda(setup, release, tmp_path, capsys):
    msg = "--device cuda: CUDA is not available on this machine; use --device cpu"
    with pytest.raises(CheckError, match=msg):
        train.main(stage1_args(setup, tmp_path / "x", "--device", "cuda"))
    assert infer.cli(["hi", "--model", str(release), "--device", "cuda"]) == 1
    assert one_line_error(capsys.readouterr().err) == msg


def test_max_length_cutting_into_audio(setup, tmp_path):
    with pytest.raises(CheckError, match="--max-length 5 cuts into the audio of a row"):
        train.main(stage1_args(setup, tmp_path / "x", "--max-steps", "1", "--max-length", "5"))


def test_generate_targets_missing_or_truncated_input(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert (
        gt.cli(["--mode", "tsit_s", "--in", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 1
    )
    assert (
        one_line_error(capsys.readouterr().err) == f"--in {tmp_path / 'nope.jsonl'}: no such file"
    )
    wav = write_wav(tmp_path / "a.wav", 1.5)
    packed = gzip.compress(
        "".join(json.dumps(row(i, wav, 1.5)) + "\n" for i in range(200)).encode()
    )
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    assert (
        gt.cli(["--mode", "tsit_s", "--in", str(tmp_path / "cut.jsonl.gz"), "--out", str(out)]) == 1
    )
    assert one_line_error(capsys.readouterr().err).startswith(
        f"{tmp_path / 'cut.jsonl.gz'}: unreadable ("
    )


def test_max_new_tokens_zero_is_refused_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gt.parse_args(
            ["--mode", "sift_s", "--model", "m", "--in", "a", "--out", "b", "--max-new-tokens", "0"]
        )
    assert "--max-new-tokens must be positive, got 0" in capsys.readouterr().err
    assert infer.cli(["hi", "--model", str(tmp_path / "nothing"), "--max-new-tokens", "0"]) == 1
    assert one_line_error(capsys.readouterr().err) == "--max-new-tokens must be positive, got 0"
    with pytest.raises(SystemExit):
        evaluate.parse_args(
            ["--model", "m", "--manifest", "x", "--task", "align", "--max-new-tokens", "0"]
        )
    assert "--max-new-tokens must be positive, got 0" in capsys.readouterr().err


def test_evaluate_missing_manifest(release, tmp_path, capsys):
    assert (
        evaluate.cli(
            [
                "--model",
                str(release),
                "--manifest",
                str(tmp_path / "nope.jsonl"),
                "--task",
                "align",
                "--device",
                "cpu",
            ]
        )
        == 1
    )
    assert (
        one_line_error(capsys.readouterr().err)
        == f"--manifest {tmp_path / 'nope.jsonl'}: no such file"
    )


# -------------------------------------------------------------------------------------------------
# 10. minor


def test_metrics_after_resume_do_not_repeat_steps(setup, tmp_path):
    exp = tmp_path / "exp"
    common = ("--max-duration", "1.6", "--save-every", "2", "--decay-steps", "5", "--log-batches")
    train.main(stage1_args(setup, exp, "--max-steps", "3", *common))  # checkpoints at 2 and 3
    (exp / "checkpoints" / "step-00000003.pt").unlink()  # as if killed after step 3's log line
    train.main(stage1_args(setup, exp, "--max-steps", "5", "--resume", *common))
    steps = [
        json.loads(x)["step"]
        for x in (exp / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(x)
    ]
    assert steps == [1, 2, 3, 4, 5]
    # the batch log names the step about to run (0-based): each once, in order
    batches = [json.loads(x) for x in (exp / "batches.rank0.jsonl").read_text().splitlines()]
    assert [b["step"] for b in batches] == [0, 1, 2, 3, 4]


def test_metrics_partial_last_line_is_cut_on_resume(tmp_path, capsys):
    """A kill during an append leaves half a line: the resumed run cuts it (with a message) and
    keeps the whole records up to its checkpoint; a broken line elsewhere is an error, not
    skipped."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    checks.truncate_log(path, lambda r: r["step"] <= 2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:2]
    assert "dropping a partial last line (15 bytes)" in capsys.readouterr().err
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(CheckError, match=re.escape(f"{path}:2: not valid JSON")):
        checks.truncate_log(path, lambda r: True)


def test_stage1_refuses_init(setup, tmp_path):
    with pytest.raises(CheckError, match="--init is for stage 2"):
        train.main(stage1_args(setup, tmp_path / "x", "--init", str(tmp_path)))


def test_top_p_out_of_range(release, capsys):
    assert infer.cli(["hi", "--model", str(release), "--temperature", "1", "--top-p", "2"]) == 1
    assert one_line_error(capsys.readouterr().err) == "--top-p must be in (0, 1], got 2"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o027])
def test_write_atomic_follows_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        files.write_atomic(tmp_path / "f.txt", ["x\n"])
        data.write_manifest([], tmp_path / "m.jsonl")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "m.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask


def test_mistyped_local_model_path(tmp_path, monkeypatch):
    from support.model_support import resolve_model_dir

    (tmp_path / "exp").mkdir()
    monkeypatch.chdir(tmp_path)
    for typo in ("exp/stage2", "./stage2", str(tmp_path / "exp" / "stage2")):
        with pytest.raises(FileNotFoundError, match=f"^model folder {typo}: no such folder$"):
            resolve_model_dir(typo)


# -------------------------------------------------------------------------------------------------
# 4 and 8 with real processes: two generation runs on one output; a training run killed mid-way


def tsit_manifest(tmp_path, n):
    wav = write_wav(tmp_path / "a.wav", 1.5)
    return rows(tmp_path / "in.jsonl", [row(i, wav, 1.5) for i in range(n)])


def test_resume_drops_identical_duplicates_and_names_differing_ones(tmp_path):
    manifest = tsit_manifest(tmp_path, 6)
    out = tmp_path / "out.jsonl"
    gt.main(["--mode", "tsit_s", "--in", str(manifest), "--out", str(out), "--no-progress"])
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4] + lines[1:3]))  # what two concurrent runs used to leave
    summary = gt.main(
        ["--mode", "tsit_s", "--in", str(manifest), "--out", str(out), "--no-progress"]
    )
    assert out.read_text() == "".join(lines) and summary.resumed == 4
    changed = lines[2].replace('"cat"', '"dog"').replace('"utterance 2"', '"other"')
    assert changed != lines[2]
    out.write_text("".join(lines[:4]) + changed)
    with pytest.raises(
        CheckError,
        match=f"{out}:5: id 'u2' written twice with different content \\(first on line 3\\)",
    ):
        gt.main(["--mode", "tsit_s", "--in", str(manifest), "--out", str(out), "--no-progress"])


class GatedBackend:
    """tsit_s that holds its first batch until the file `gate` exists: the run keeps its lock on the
    output for as long as the test needs, however slowly a second process starts."""

    def __init__(self, gate):
        self.inner, self.gate = gt.TranscriptBackend(), gate
        self.model_label = self.inner.model_label

    def batches(self, prompts):
        return [[i] for i in range(len(prompts))]

    def generate(self, prompts):
        deadline = time.time() + 60
        while not os.path.exists(self.gate) and time.time() < deadline:
            time.sleep(0.05)
        return self.inner.generate(prompts)


def start(code, *args):
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "tests"},  # test_reliability
    )


GENERATE = (
    "import sys; import generate_targets as gt; "
    "from test_reliability import GatedBackend; "
    "sys.exit(gt.cli(sys.argv[2:], backend=GatedBackend(sys.argv[1])))"
)


@pytest.mark.slow
def test_concurrent_generation_and_killed_training(setup, tmp_path):
    # two generation runs on one --out: the second is refused and names the holder; the first is
    # complete
    manifest = tsit_manifest(tmp_path, 20)
    out = tmp_path / "out.jsonl"
    gate = tmp_path / "gate"
    first = start(
        GENERATE, gate, "--mode", "tsit_s", "--in", manifest, "--out", out, "--no-progress"
    )
    deadline = time.time() + 60
    while not (out.exists() and Path(f"{out}.lock").exists()) and time.time() < deadline:
        time.sleep(0.05)
    second = start(
        GENERATE, gate, "--mode", "tsit_s", "--in", manifest, "--out", out, "--no-progress"
    )
    _, err2 = second.communicate(timeout=60)
    gate.touch()  # now the first run may generate
    _, err1 = first.communicate(timeout=60)
    assert first.returncode == 0, err1
    assert second.returncode == 1
    assert err2 == (
        f"error: {out} is being written by another run (pid {first.pid} on {os.uname().nodename}); "
        "wait for it to finish, or use another --out\n"
    )
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert ids == [f"u{i}" for i in range(20)]

    # training killed after its second checkpoint, the newest checkpoint then truncated:
    # --resume goes back
    # to the readable one and finishes
    exp = tmp_path / "exp"
    cmd = [
        str(ROOT / "train.py"),
        *stage1_args(
            setup,
            exp,
            "--max-steps",
            "40",
            "--max-duration",
            "1.6",
            "--save-every",
            "1",
            "--keep-last",
            "5",
        ),
    ]
    run = subprocess.Popen(
        [sys.executable, *cmd],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 90
    while len(list((exp / "checkpoints").glob("step-*.pt"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    ckpts = sorted((exp / "checkpoints").glob("step-*.pt"))
    assert len(ckpts) >= 3 and not (exp / "model.safetensors").exists()
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:100])
    newest = int(ckpts[-1].stem.split("-")[1])  # step-00000007 -> 7
    resumed = subprocess.run(
        [sys.executable, *cmd, "--max-steps", str(newest + 1), "--resume"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"note: {ckpts[-1]} is unreadable" in resumed.stdout
    assert f"resumed from {ckpts[-2]} at step {newest - 1}" in resumed.stdout
    assert (exp / "model.safetensors").exists()
