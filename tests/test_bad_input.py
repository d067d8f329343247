"""Bad input, second probe (issue 26): judge replies, limits on generation, flag values, and a few
inputs that used to end in a traceback or a silent wrong result. Each case ends in the right
behaviour or one line naming the input and the fix. Everything runs in-process on tiny models."""

import io
import json
import os
import shutil
import socket

import numpy as np
import pytest
import soundfile as sf
import torch

import benchmarks as B
import evaluate
import infer
import train
from support import checks
from support import manifest as manifest_module
from support.checks import CheckError
from support.manifest import ManifestError
from test_train import build_setup, stage1_args
from tiny import JsonHandler, cached_tiny_release, make_tiny_llm_dir, serve, write_wav


@pytest.fixture(scope="module")
def release():
    return cached_tiny_release()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("bad_input"), with_train16=False)


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
    assert infer.cli(["hi", "--model", str(release), "--top-p", "0.9"]) == 1
    assert one_line_error(capsys.readouterr().err) == (
        "--top-p applies only when sampling: add --temperature T (> 0); without it decoding is "
        "greedy")
    assert infer.cli(["hi", "--model", str(release), "--temperature", "nan"]) == 1
    assert one_line_error(capsys.readouterr().err) == (
        "--temperature must be a finite number, got nan")


def test_infer_max_audio_seconds_nan_does_not_lift_the_limit(release, tmp_path, capsys):
    wav = write_wav(tmp_path / "a.wav", 0.5)
    assert infer.cli([str(wav), "hi", "--model", str(release), "--max-audio-seconds", "nan"]) == 1
    assert one_line_error(capsys.readouterr().err) == (
        "--max-audio-seconds must be a finite number, got nan")


# -------------------------------------------------------------------------------------------------
# 4. Judge replies that are not texts are failed jobs, asked again by the next run; the judge's
# name is part of the cache key; `score --out` with a typo is an error


class OddJudge(JsonHandler):
    """Replies with `OddJudge.reply` (a JSON value) until `fixed`, then with a proper completion
    whose text names the judge model it was asked for."""

    reply, fixed, asked = None, False, []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        OddJudge.asked.append(body["model"])
        reply = OddJudge.reply
        if OddJudge.fixed:
            reply = {"choices": [{"message": {"role": "assistant",
                                              "content": f"5 from {body['model']}"}}]}
        self.send_json(reply)


@pytest.fixture
def odd_judge():
    OddJudge.reply, OddJudge.fixed, OddJudge.asked = None, False, []
    with serve(OddJudge) as url:
        yield url


JOB = [{"key": "k", "messages": [{"role": "user", "content": "rate"}], "params": {"n": 1}}]


def judge(url, model="j"):
    return B.JudgeOptions(url, model, workers=1, retries=1, retry_sleep=0.0)


@pytest.mark.parametrize("reply", [
    {"choices": [{"message": {"role": "assistant", "content": None}}]},  # content: null
    [{"message": {"content": "5"}}],  # a JSON list
    {"choices": [{"message": None}]},  # a null message
    {"choices": ["5"]},  # string choices
], ids=["content-null", "json-list", "null-message", "string-choices"])
def test_judge_reply_without_text_is_a_failed_job(odd_judge, tmp_path, capsys, reply):
    path = tmp_path / "judge.jsonl"
    OddJudge.reply = reply
    done, errors = B.run_judge(JOB, path, judge(odd_judge))
    assert (done, errors) == ({}, 1) and not path.exists()  # nothing cached
    assert f"judge failed on k: judge {odd_judge}: a " in capsys.readouterr().err
    OddJudge.fixed = True  # the next run asks again and keeps the text
    done, errors = B.run_judge(JOB, path, judge(odd_judge))
    assert errors == 0 and done["k"]["outputs"] == ["5 from j"]


def test_cached_null_judge_output_is_asked_again(odd_judge, tmp_path):
    path = tmp_path / "judge.jsonl"  # what the old code cached from a `content: null` reply
    path.write_text(json.dumps({"key": "k", "judge": "j", "params": {"n": 1},
                                "outputs": [None]}) + "\n")
    OddJudge.fixed = True
    done, errors = B.run_judge(JOB, path, judge(odd_judge))
    assert errors == 0 and done["k"]["outputs"] == ["5 from j"] and OddJudge.asked == ["j"]


def test_another_judge_model_does_not_reuse_outputs(odd_judge, tmp_path):
    path, OddJudge.fixed = tmp_path / "judge.jsonl", True
    B.run_judge(JOB, path, judge(odd_judge, "judge-a"))
    done, _ = B.run_judge(JOB, path, judge(odd_judge, "judge-b"))
    assert done["k"]["outputs"] == ["5 from judge-b"]
    done, _ = B.run_judge(JOB, path, judge(odd_judge, "judge-a"))  # its own outputs are kept
    assert done["k"]["outputs"] == ["5 from judge-a"]
    assert OddJudge.asked == ["judge-a", "judge-b"]


def test_score_out_typo_is_one_line(tmp_path, capsys):
    assert B.cli(["score", "--out", str(tmp_path / "rnu")]) == 1
    assert capsys.readouterr().err == (f"error: --out {tmp_path / 'rnu'}: no such folder (expected "
                                       "voicebench/, air_foundation/ or air_chat/ with a "
                                       "run.json); answer a benchmark into it first\n")
    assert not (tmp_path / "rnu").exists()


# -------------------------------------------------------------------------------------------------
# 6. Generation is bounded by the LLM's context (the tiny LLM's: 4096 positions)


def test_prompt_longer_than_the_context_is_refused(release, capsys):
    prompt = "hello " * 20000  # 120k characters
    assert infer.cli([prompt, "--model", str(release)]) == 1
    message = one_line_error(capsys.readouterr().err)
    tokens = int(message.split()[3])  # "a prompt of N tokens ..."
    assert tokens > 4096 and message == (
        f"a prompt of {tokens} tokens (text and audio frames) does not fit the LLM's context of "
        "4096 tokens: shorten the prompt or the audio")


def test_max_new_tokens_past_the_context_is_refused(release, tmp_path, capsys):
    wav = write_wav(tmp_path / "a.wav", 1.0)
    assert infer.cli([str(wav), "hi", "--model", str(release), "--max-new-tokens",
                       "100000000"]) == 1
    message = one_line_error(capsys.readouterr().err)
    prompt = int(message.split()[6])  # "--max-new-tokens M after a prompt of N tokens ..."
    assert message == (f"--max-new-tokens 100000000 after a prompt of {prompt} tokens runs past "
                       f"the LLM's context of 4096 tokens: use at most {4096 - prompt}")


# -------------------------------------------------------------------------------------------------
# 8. Inputs that ended in a traceback or a silent wrong result


@pytest.mark.parametrize("part, key, value", [
    ("config.json", "speech_encoder_projector_ds_rate", "4"),
    ("llm/config.json", "vocab_size", "608"),
])
def test_number_written_as_a_string_in_a_config(release, tmp_path, capsys, part, key, value):
    folder = tmp_path / "release"
    shutil.copytree(release, folder)
    config = json.loads((folder / part).read_text())
    config[key] = value
    (folder / part).write_text(json.dumps(config))
    assert infer.cli(["hi", "--model", str(folder)]) == 1
    assert one_line_error(capsys.readouterr().err) == (
        f"{folder / part}: field '{key}' is the string '{value}', not a number; write it without "
        "quotes")


def test_comment_line_in_a_task_file(release, tmp_path, capsys):
    wav = write_wav(tmp_path / "a.wav", 1.0)
    task = tmp_path / "open.jsonl"
    task.write_text("# open questions\n" + json.dumps({"audio": str(wav)}) + "\n")
    assert evaluate.cli(["--model", str(release), "--manifest", str(task), "--task", "open",
                         "--out", str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert one_line_error(capsys.readouterr().err) == (
        f"{task}:1: not valid JSON (Expecting value); a task file holds one JSON object per line "
        "(no comments)")


def test_audio_token_inside_a_response(setup, tmp_path):
    from llm import AUDIO_TOKEN

    wav = write_wav(tmp_path / "a.wav", 1.0)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "u0", "audio": str(wav), "duration": 1.0,
                                    "response": f"it says {AUDIO_TOKEN} twice"}) + "\n")
    assert AUDIO_TOKEN == manifest_module.AUDIO_TOKEN  # the manifest reader's copy of the token
    with pytest.raises(ManifestError) as e:
        train.main(stage1_args(setup, tmp_path / "exp", "--max-steps", "1", train=str(manifest)))
    assert str(e.value) == (f"{manifest}:1: field 'response': contains <|AUDIO|>, the token that "
                            "marks where audio goes in a prompt; remove it from the text")


def test_resume_with_an_llm_of_another_size(setup, tmp_path):
    exp = tmp_path / "exp"
    common = ("--max-duration", "1.6", "--save-every", "1")
    train.main(stage1_args(setup, exp, "--max-steps", "1", *common))
    ckpt = torch.load(exp / "checkpoints" / "step-00000001.pt", weights_only=True)
    saved = tuple(ckpt["projectors"]["speech_encoder_projector"]["linear1.weight"].shape)
    assert saved[0] == 64  # the setup's LLM width; the other LLM has 32
    args = stage1_args(setup, exp, "--max-steps", "2", "--resume", *common)
    args[args.index("--llm") + 1] = str(make_tiny_llm_dir(tmp_path / "llm32", hidden=32))
    with pytest.raises(CheckError) as e:
        train.main(args)
    assert str(e.value) == (
        "--resume: the checkpoint of step 1 does not fit this model (speech_encoder_projector."
        f"linear1.weight {saved} vs {(32, saved[1])}): it was trained with --llm "
        f"{setup['llm']} and --speech-encoder {setup['speech']}; resume with those, or start "
        "afresh in another --exp")


def test_nan_audio_in_a_voicebench_parquet_is_skipped(release, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from model import AZeroS
    from paper_benchmarks import bench_data as BD

    def wav(samples):
        buf = io.BytesIO()
        sf.write(buf, np.asarray(samples, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
        return buf.getvalue()

    good = 0.3 * np.sin(np.arange(8000) / 5.0)
    rows = [{"audio": {"bytes": wav(good), "path": "0.wav"}, "prompt": "q0", "reference": "A"},
            {"audio": {"bytes": wav(np.where(np.arange(8000) == 100, np.nan, good)),
                       "path": "1.wav"}, "prompt": "q1", "reference": "B"}]
    (tmp_path / "vb" / "mmsu").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows),
                   tmp_path / "vb" / "mmsu" / "law-00000-of-00001.parquet")
    model = AZeroS.from_pretrained(str(release), device="cpu").eval()
    opts = B.RunOptions(str(release), tmp_path / "run", batch_size=2, max_new_tokens=2)
    bench = BD.read_voicebench(tmp_path / "vb", "mmsu", "law")
    info = B.answer_benchmark(model, "voicebench", {"mmsu/law": bench}, opts)
    assert (info["answered"], info["skipped"]) == (1, 1)
    assert info["skipped_items"] == {
        "mmsu/law/1": "unreadable audio: mmsu/law/1: contains NaN or Inf samples"}


def test_two_evaluate_runs_into_one_out(release, tmp_path, capsys):
    wav = write_wav(tmp_path / "a.wav", 1.0)
    task = tmp_path / "open.jsonl"
    task.write_text(json.dumps({"audio": str(wav), "question": "what?"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--model", str(release), "--manifest", str(task), "--task", "open", "--out", str(out),
            "--device", "cpu", "--max-new-tokens", "2", "--systems", "audio"]
    with checks.exclusive_lock(out / "open_answers.jsonl"):  # a first run, still answering
        assert evaluate.cli(argv) == 1
    last = capsys.readouterr().err.split("\r")[-1].splitlines()[-1] + "\n"  # after the bars
    assert one_line_error(last) == (
        f"{out / 'open_answers.jsonl'} is being written by another run (pid {os.getpid()} on "
        f"{socket.gethostname()}); wait for it to finish, or use another --out")
    assert not (out / "open_answers.jsonl").exists()  # the second run answered nothing
    evaluate.main(argv)  # once the first is done, a run goes ahead
    assert len((out / "open_answers.jsonl").read_text().splitlines()) == 1


def test_folder_named_like_an_audio_file(release, tmp_path, capsys):
    folder = tmp_path / "x.wav"
    folder.mkdir()
    assert infer.cli([str(folder), "hi", "--model", str(release)]) == 1
    assert one_line_error(capsys.readouterr().err) == f"{folder}: a folder, not an audio file"


def test_llm_config_with_auto_map_never_runs_folder_code(tmp_path, monkeypatch):
    """trust_remote_code=False on every load: a known model type loads transformers' own class; a
    type that exists only as the folder's code is one line. transformers never asks "[y/N]"."""
    import llm

    def no_prompt(*args):
        raise AssertionError("transformers asked whether to run the folder's code")

    monkeypatch.setattr("builtins.input", no_prompt)
    folder = make_tiny_llm_dir(tmp_path / "llm")
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig",
                          "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = llm.load_llm(str(folder))
    assert type(model).__name__ == "Qwen2ForCausalLM" and not marker.exists()
    config["model_type"] = "evil"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckError) as e:
        llm.load_llm(str(folder))
    assert str(e.value) == (f"{folder}: its config asks to run code from the model folder "
                            "(auto_map), which AZeroS never does; use an LLM that transformers "
                            "implements")
    assert not marker.exists()


def test_run_command_is_the_one_error_path(monkeypatch, capsys):
    """A user-fixable error is one line and exit status 1, Ctrl-C 130, a bug its traceback, and
    AZEROS_TRACEBACK=1 keeps the traceback of a user-fixable error too."""
    from support import checks

    def main_raising(error):
        def main(argv):
            raise error
        return main

    monkeypatch.delenv("AZEROS_TRACEBACK", raising=False)
    assert checks.run_command(main_raising(checks.CheckError("m.jsonl:3: no 'text'\nmore"))) == 1
    assert capsys.readouterr().err == "error: m.jsonl:3: no 'text'\n"
    assert checks.run_command(main_raising(KeyboardInterrupt())) == 130
    with pytest.raises(KeyError):
        checks.run_command(main_raising(KeyError("a bug")))
    assert checks.run_command(lambda argv: {"result": argv}, ["x"]) == 0
    monkeypatch.setenv("AZEROS_TRACEBACK", "1")
    with pytest.raises(checks.CheckError, match="m.jsonl:3"):
        checks.run_command(main_raising(checks.CheckError("m.jsonl:3: no 'text'")))
