"""Training faults (issue 26, points 1, 2, 3, 5, 9): each case ends in correct behaviour or one line
naming the input and the fix, with nothing lost.

  1. a non-finite loss or gradient stops the run before the update, naming the step and its rows;
  2. a run's identity (data, frozen weights, flags) is checked on --resume; --overwrite starts a
     new run; one training per --exp; the encoder cache notices a rewritten wav;
  3. an epoch without a batch is refused (it looped at 100% CPU);
  5. outputs follow the umask; a full disk or SIGTERM leaves no partial file; a bad --exp fails
     before the first step;
  9. MKL's thread count does not follow the load, and two identical runs agree bit for bit.

Tiny random models on the CPU (tests/test_train.py's setup); runs of 1-6 steps.
"""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import data
import generate_targets as gt
import model
import train
from conftest import ROOT
from support import data_support
from support.train_support import TrainError
from test_train import build_setup, losses, make_llm_dir, stage1_args, write_manifest
from tiny import write_wav

SMALL = ("--max-duration", "1.6", "--save-every", "1", "--decay-steps", "6")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("faults"), with_train16=False)


def cli(argv, monkeypatch, capsys) -> str:
    """train.py's command line: exit status 1 and one line on stderr, which is returned."""
    capsys.readouterr()
    status = train.cli(argv)
    err = capsys.readouterr().err  # the progress bars, then the error
    last = err.replace("\r", "\n").rstrip("\n").split("\n")[-1]
    assert status == 1 and err.endswith("\n") and "Traceback" not in err, err
    assert err.count("error: ") == 1 and last.startswith("error: "), err
    return last[len("error: "):]


def steps_saved(exp) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in sorted((exp / "checkpoints").glob("step-*.pt"))]


def leftovers(folder) -> list:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture
def no_hang():
    """A run that would loop forever fails after 120 s instead of blocking the suite."""

    def alarm(signum, frame):
        raise TimeoutError("still running after 120 s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# -------------------------------------------------------------------------------------------------
# 1. Non-finite training


def test_lr_1e6_stops_at_the_first_non_finite_step(setup, tmp_path, monkeypatch, capsys):
    exp = tmp_path / "exp"
    err = cli(stage1_args(setup, exp, "--max-steps", "6", *SMALL, "--lr", "1e6"), monkeypatch,
              capsys)
    step = int(err.split(":")[0].removeprefix("step "))
    assert step >= 2  # step 1 starts from finite random projectors
    assert " gradient norm " in err and "stopped before the update and nothing was exported" in err
    # every logged step before it is finite, and so is every checkpoint: the last one is kept
    logged = [json.loads(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, step))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in logged)
    assert steps_saved(exp)[-1] == step - 1
    last = exp / "checkpoints" / f"step-{step - 1:08d}.pt"
    assert f"the last checkpoint, {last}, is finite" in err
    ckpt = torch.load(last, weights_only=True)
    assert all(t.isfinite().all() for t in ckpt["projectors"]["speech_encoder_projector"].values())
    assert not (exp / "model.safetensors").exists() and not (exp / "config.json").exists()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_huge_float_wav_is_refused_when_read(setup, tmp_path, monkeypatch, capsys, workers):
    # samples of 1e30 are finite float32, so the NaN/Inf check passed them, but their fbank is Inf
    # and training went NaN
    huge = tmp_path / "huge.wav"
    sf.write(str(huge), np.full(12000, 1e30, dtype=np.float32), 16000, subtype="FLOAT")
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "ok", "audio": str(write_wav(tmp_path / "ok.wav", 0.75)), "duration": 0.75},
            {"id": "huge", "audio": str(huge), "duration": 0.75}]
    manifest.write_text("".join(json.dumps({**r, "text": "x", "mode": "sift_s",
                                            "response": "cat", "truncated": False}) + "\n"
                                for r in rows))
    exp = tmp_path / "exp"
    # read in a DataLoader worker, the error used to come back as a RuntimeError and a traceback
    err = cli(stage1_args(setup, exp, "--max-steps", "3", *SMALL, "--num-workers", workers,
                          train=str(manifest)), monkeypatch, capsys)
    assert err == (f"{huge}: samples reach 1e+30; past 7.3e+14 the float32 fbank overflows to Inf "
                   "(float audio lies in [-1, 1])")
    assert not (exp / "checkpoints").exists() and not (exp / "model.safetensors").exists()


def test_max_sample_keeps_the_fbank_finite():
    """data_support.MAX_SAMPLE is derived from data.fbank's constants (400-sample frames, DC
    removal, pre-emphasis, 257 bins): signals just under it give a finite fbank, whatever their
    spectrum; 1e30 overflows."""
    bound = math.sqrt(float(np.finfo(np.float32).max) / (data.FFT_SIZE // 2 + 1)) / (
        data.FRAME_LENGTH * 2 * (1 + data.PREEMPH))
    assert data_support.MAX_SAMPLE == bound
    a, n = 0.999 * bound, np.arange(16000)
    for wave in (np.full(16000, a), a * (-1.0) ** n, a * np.sin(2 * np.pi * 7000 * n / 16000),
                 a * np.random.default_rng(0).choice([-1.0, 1.0], 16000)):
        assert torch.isfinite(data.fbank([torch.tensor(wave, dtype=torch.float32)])[0]).all()
    assert not torch.isfinite(data.fbank([torch.full((16000,), 1e30)])[0]).all()


# -------------------------------------------------------------------------------------------------
# 2. Lineage


def run_steps(setup, exp, n, *extra, **kw):
    return train.main(stage1_args(setup, exp, "--max-steps", str(n), *SMALL, *extra, **kw))


@pytest.mark.parametrize("change", ["manifest", "llm", "lr"])
def test_resume_refuses_another_run_unless_forced(setup, tmp_path, change):
    manifest = write_manifest(tmp_path / "m.jsonl", 4, seconds=lambda i: 0.6 + 0.02 * i)
    exp = tmp_path / "exp"
    run_steps(setup, exp, 2, train=str(manifest))
    extra, s, why = [], setup, ""
    if change == "manifest":  # one response changed, same number of rows
        manifest.write_text(manifest.read_text().replace('"response": "cat"', '"response": "sun"'))
        why = "the --train manifests' contents or weights"
    elif change == "llm":  # another LLM of the same size
        s = {**setup, "llm": str(make_llm_dir(tmp_path / "llm2", seed=5))}
        why = f"the frozen weights (LLM, encoders; was --llm {setup['llm']})"
    else:
        extra, why = ["--lr", "0.02"], "--lr 0.02 (was 0.01)"
    before = (exp / "run.json").read_text()
    with pytest.raises(TrainError) as e:
        run_steps(s, exp, 3, "--resume", *extra, train=str(manifest))
    assert (exp / "run.json").read_text() == before  # the refused run changed nothing
    assert str(e.value) == (
        f"--resume: the checkpoint of step 2 belongs to another run; changed: {why}. Pass "
        "--force-resume to continue it anyway, or --overwrite to start afresh")
    r = run_steps(s, exp, 3, "--resume", "--force-resume", *extra, train=str(manifest))
    assert r["step"] == 3 and json.loads((exp / "run.json").read_text())["train"][0]["sha256"] \
        == files_sha256(manifest)


def files_sha256(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_overwrite_then_resume_continues_the_new_run(setup, tmp_path, capsys):
    exp = tmp_path / "exp"
    run_steps(setup, exp, 5, "--keep-last", "2")  # the old run: checkpoints 4 and 5, a model
    run_steps(setup, exp, 2, "--keep-last", "2", "--overwrite", "--seed", "7")
    # the new run's checkpoints 1 and 2 sorted before the old 4 and 5, and rotation deleted them
    assert steps_saved(exp) == [1, 2]
    capsys.readouterr()
    r = run_steps(setup, exp, 3, "--keep-last", "2", "--resume", "--seed", "7")
    assert f"resumed from {exp / 'checkpoints' / 'step-00000002.pt'} at step 2" in \
        capsys.readouterr().out
    assert r["step"] == 3 and json.loads((exp / "run.json").read_text())["flags"]["seed"] == 7


def test_fresh_run_refuses_an_unfinished_runs_checkpoints(setup, tmp_path):
    exp = tmp_path / "exp"
    run_steps(setup, exp, 2)
    (exp / "model.safetensors").unlink()  # killed before the export
    with pytest.raises(TrainError, match=r"holds checkpoints of an unfinished run \(step-00000002"
                                         r"\.pt\); pass --resume to continue it, --overwrite"):
        run_steps(setup, exp, 2)
    assert steps_saved(exp) == [1, 2]


def test_two_trainings_into_one_exp(setup, tmp_path, monkeypatch, capsys):
    exp = tmp_path / "exp"
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"),
         *stage1_args(setup, exp, "--max-steps", "200", "--max-duration", "1.6")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (exp / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read()
        err = cli(stage1_args(setup, exp, "--max-steps", "2", "--max-duration", "1.6"),
                  monkeypatch, capsys)
        assert err == (f"--exp {exp} is being written by another run (pid {first.pid} on "
                       f"{os.uname().nodename}); wait for it to finish, or use another --exp")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 143  # SIGTERM ends it through `finally`: status 128 + 15
    assert leftovers(exp) == []


def test_encoder_cache_notices_a_rewritten_wav(setup, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", 2, seconds=lambda i: 0.7)
    cache = str(tmp_path / "cache")
    common = ("--max-duration", "1.6", "--no-spec-augment", "--average-period", "0")
    run = lambda name, *x: losses(train.main(stage1_args(
        setup, tmp_path / name, "--max-steps", "1", *common, *x, train=str(manifest))))
    run("fill", "--cache-encoders", cache)
    write_wav(tmp_path / "m_wav" / "u0.wav", 0.7, seed=9)  # same length, other samples
    plain = run("plain")
    assert run("cached", "--cache-encoders", cache) == plain  # recomputed, not the old outputs


# -------------------------------------------------------------------------------------------------
# 3. An epoch without a batch


def test_epoch_without_a_batch_is_refused(setup, tmp_path, no_hang):
    with pytest.raises(TrainError) as e:
        train.main(stage1_args(setup, tmp_path / "exp", "--max-steps", "3", "--max-duration",
                               "1.6", train=f"{setup['train8']}:0.05"))
    assert str(e.value) == (
        f"an epoch has 0 batches per rank: --train {setup['train8']}:0.05 keeps no utterance for "
        "every rank (a weight of 0.05 on 8 rows keeps round(0.4) = 0); raise the weights after "
        "':' or use fewer ranks")


# -------------------------------------------------------------------------------------------------
# 5. Files


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_follow_the_umask(setup, tmp_path, umask):
    old = os.umask(umask)
    try:
        run_steps(setup, tmp_path / "exp", 1)
    finally:
        os.umask(old)
    exp = tmp_path / "exp"
    made = [exp / "model.safetensors", exp / "config.json", exp / "metrics.jsonl",
            exp / "run.json", exp / "checkpoints" / "step-00000001.pt", exp / "tokenizer.json"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in made} == \
        {p.name: oct(0o666 & ~umask) for p in made}


def full_disk_after(n_bytes):
    def save_file(tensors, path, metadata=None):
        open(path, "wb").write(b"x" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return save_file


def test_disk_full_during_export(setup, tmp_path, monkeypatch, capsys):
    exp = tmp_path / "exp"
    monkeypatch.setattr(model, "save_file", full_disk_after(100))
    err = cli(stage1_args(setup, exp, "--max-steps", "2", *SMALL), monkeypatch, capsys)
    assert err == (f"could not export the model to {exp} ([Errno 28] No space left on device); "
                   "nothing half-written is left and the step-2 checkpoint is kept: free some "
                   "space and run again with --resume")
    assert not (exp / "config.json").exists() and not (exp / "model.safetensors").exists()
    assert leftovers(exp) == [] and steps_saved(exp) == [1, 2]
    monkeypatch.undo()
    r = run_steps(setup, exp, 2, "--resume")  # space freed: the same run exports
    assert r["step"] == 2 and (exp / "config.json").exists()
    assert load_file(str(exp / "model.safetensors")).keys()


def test_disk_full_while_appending_targets(tmp_path, capsys, monkeypatch):
    wav = write_wav(tmp_path / "a.wav", 1.0)
    manifest = tmp_path / "in.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"u{i}", "audio": str(wav), "duration": 1.0,
                                            "text": f"utterance {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "out.jsonl"
    write = os.write

    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") == str(out):
            write(fd, bytes(data[:10]))  # part of a line reaches the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(fd, data)

    monkeypatch.setattr(os, "write", full)
    argv = ["--mode", "tsit_s", "--in", str(manifest), "--out", str(out), "--no-progress"]
    assert gt.cli(argv) == 1
    monkeypatch.undo()
    assert capsys.readouterr().err == (
        f"error: could not append to {out}: [Errno 28] No space left on device\n")
    assert out.read_text() == ""  # cut back: no partial line
    assert gt.cli(argv) == 0 and len(out.read_text().splitlines()) == 4


SIGTERM_IN_SAVE = """
import os, signal, sys, time
sys.path[:0] = ["tests", "."]
import torch, train
from test_train import stage1_args
save = torch.save
def save_and_die(obj, f):
    save(obj, f)
    if "step-00000002" in str(f) or ".step-00000002" in str(f):
        os.kill(os.getpid(), signal.SIGTERM)  # mid-write: the file is not renamed yet
        time.sleep(5)
torch.save = save_and_die
setup = dict(zip(["llm", "speech", "train8"], sys.argv[2:5]))
train.main(stage1_args(setup, sys.argv[1], "--max-steps", "4", "--max-duration", "1.6",
                       "--save-every", "1"))
"""


def test_sigterm_during_a_checkpoint_write_leaves_no_tmp(setup, tmp_path):
    exp = tmp_path / "exp"
    r = subprocess.run([sys.executable, "-c", SIGTERM_IN_SAVE, str(exp), setup["llm"],
                        setup["speech"], setup["train8"]], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 143, r.stderr[-2000:]
    assert leftovers(exp) == [] and steps_saved(exp) == [1]


def test_temporary_files_of_a_killed_run_are_removed(setup, tmp_path, capsys):
    exp = tmp_path / "exp"
    run_steps(setup, exp, 1)
    stale = exp / "checkpoints" / ".step-00000002.pt.k1ll3d.tmp"  # what SIGKILL mid-write leaves
    stale.write_bytes(b"partial")
    capsys.readouterr()
    run_steps(setup, exp, 2, "--resume")
    assert f"note: removed 1 temporary file(s) left in {exp} by a killed run" in \
        capsys.readouterr().out
    assert leftovers(exp) == [] and steps_saved(exp) == [1, 2]


def test_exp_that_is_a_file_fails_before_the_first_step(setup, tmp_path, monkeypatch, capsys):
    exp = tmp_path / "exp"
    exp.write_text("not a folder")
    steps = []
    monkeypatch.setattr(train, "run_batch", lambda *a, **k: steps.append(1))
    err = cli(stage1_args(setup, exp, "--max-steps", "1"), monkeypatch, capsys)
    assert err == f"--exp {exp} is a file, not a folder: choose another --exp" and steps == []


@pytest.mark.parametrize("where", ["chmod 555", "sysfs"])
def test_read_only_exp_fails_before_the_first_step(setup, tmp_path, monkeypatch, capsys, where):
    if where == "chmod 555":  # root writes into such a folder all the same (CI runs as root)
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        exp, why = tmp_path / "ro" / "exp", "Permission denied"
        exp.parent.mkdir()
        exp.parent.chmod(0o555)
    else:  # /sys is read-only for root too
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("no sysfs")
        exp = "/sys/azeros-test-exp"  # EPERM for root, EACCES for others
        why = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
    steps = []
    monkeypatch.setattr(train, "run_batch", lambda *a, **k: steps.append(1))
    try:
        err = cli(stage1_args(setup, exp, "--max-steps", "1"), monkeypatch, capsys)
    finally:
        if where == "chmod 555":
            exp.parent.chmod(0o755)
    assert err == f"--exp {exp}: cannot write there ({why}); choose another --exp"
    assert steps == []


# -------------------------------------------------------------------------------------------------
# 9. Determinism


MKL_DYNAMIC = ("import os, sys, ctypes; sys.path.insert(0, '.'); import {module}, torch; "
               "lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), 'lib', "
               "'libtorch_cpu.so')); print(os.environ['MKL_DYNAMIC'], lib.mkl_serv_get_dynamic())")


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch without Intel MKL")
@pytest.mark.parametrize("module", ["train", "evaluate", "infer", "generate_targets"])
def test_entry_points_turn_mkl_dynamic_off(module):
    env = {k: v for k, v in os.environ.items() if k != "MKL_DYNAMIC"}
    run = lambda e: subprocess.run([sys.executable, "-c", MKL_DYNAMIC.format(module=module)],
                                   cwd=ROOT, capture_output=True, text=True, env=e, timeout=120)
    assert run(env).stdout.split() == ["FALSE", "0"]  # MKL's own default is dynamic (1)
    assert run({**env, "MKL_DYNAMIC": "TRUE"}).stdout.split() == ["TRUE", "1"]  # the user's wins


def test_two_identical_runs_agree_bit_for_bit(setup, tmp_path):
    """Two straight runs of train.py as a user starts them (a fresh process each, MKL_DYNAMIC not
    set), side by side so each loads the machine while the other runs: the same losses and the same
    exported bytes. Resume tests do not catch a math library that sums in a load-dependent order."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_DYNAMIC"}
    runs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                              *stage1_args(setup, tmp_path / name, "--max-steps", "6",
                                           "--max-duration", "1.6", "--average-period", "2",
                                           "--precision", "fp32", "--device", "cpu")],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=env) for name in ("a", "b")]
    results = []
    for name, run in zip(("a", "b"), runs):
        assert run.wait(timeout=300) == 0, run.stderr.read()[-2000:]
        logged = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().split("\n")
                  if x]
        results.append(([r["loss"] for r in logged if "loss" in r],
                        (tmp_path / name / "model.safetensors").read_bytes()))
    assert len(results[0][0]) == 6
    assert results[0] == results[1]
