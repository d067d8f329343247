"""Bad input, second probe (issue 26): judge replies, limits on generation, flag values, and a few
inputs that used to end in a traceback or a silent wrong result. Each case ends in the right
behaviour or one line naming the input and the fix. Everything runs in-process on tiny models."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import benchmarks as B
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


# -------------------------------------------------------------------------------------------------
# 4. Judge replies that are not texts are failed jobs, asked again by the next run; the judge's
# name is part of the cache key; `score --out` with a typo is an error


class OddJudge(BaseHTTPRequestHandler):
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
        raw = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def odd_judge():
    server = ThreadingHTTPServer(("127.0.0.1", 0), OddJudge)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    OddJudge.reply, OddJudge.fixed, OddJudge.asked = None, False, []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


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
    with pytest.raises(SystemExit) as e:
        B.main(["score", "--out", str(tmp_path / "rnu")])
    assert e.value.code == (f"error: --out {tmp_path / 'rnu'}: no such folder (expected "
                            "voicebench/, air_foundation/ or air_chat/ with a run.json); answer "
                            "a benchmark into it first")
    assert not (tmp_path / "rnu").exists()
