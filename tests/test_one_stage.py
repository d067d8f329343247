"""train.py --stage both: the one-stage training of paper Table 6 (both projectors learn together,
or the one projector of a single Whisper encoder). Tiny random models, CPU."""
import json

import pytest
import torch
from safetensors.torch import load_file

import train
from model import AZeroS
from tiny import make_tiny_encoder_dir, make_tiny_llm_dir, make_tiny_whisper_dir, write_wav

PROJECTORS = ("speech_encoder_projector", "paraling_encoder_projector")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_stage")
    rows = []
    for i, mode in enumerate(["sift_s", "sift_sp"] * 3):  # a mixed manifest, as in one stage
        wav = write_wav(root / f"u{i}.wav", 0.7 + 0.1 * i, seed=i)
        rows.append({"id": f"u{i}", "audio": str(wav), "duration": 0.7 + 0.1 * i, "text": f"u {i}",
                     "mode": mode, "response": ["cat", "dog", "sun"][i % 3], "truncated": False})
    (root / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"llm": str(make_tiny_llm_dir(root / "llm")), "mix": str(root / "mix.jsonl"),
            "speech": str(make_tiny_encoder_dir(root / "speech", seed=1)),
            "paraling": str(make_tiny_encoder_dir(root / "paraling", seed=2)),
            "whisper": str(make_tiny_whisper_dir(root / "whisper"))}


def args(s, exp, *extra):
    return ["--stage", "both", "--llm", s["llm"], "--train", s["mix"], "--exp", str(exp),
            "--num-workers", "0", "--log-every", "1", "--warmup-steps", "1", "--lr", "1e-2",
            "--max-duration", "3", *extra]


def test_both_projectors_learn_at_once(setup, tmp_path, monkeypatch):
    """Two encoders, --stage both: both fresh projectors change (and nothing else has a gradient),
    the prompts carry both audio placeholders, and the export is a two-encoder release."""
    start, prompts = {}, []
    build = train.build_model

    def spy(a, device):
        model = build(a, device)
        start.update({k: v.clone() for k, v in model.state_dict().items() if "projector" in k})
        messages = model.training_messages
        monkeypatch.setattr(model, "training_messages",
                            lambda r: prompts.append(messages(r)[0]["content"]) or messages(r))
        return model

    monkeypatch.setattr(train, "build_model", spy)
    exp = tmp_path / "both"
    r = train.main(args(setup, exp, "--speech-encoder", setup["speech"],
                        "--paraling-encoder", setup["paraling"], "--max-steps", "3"))
    model = r["model"]
    assert model.stage == "both"
    for name in ("llm", "speech_encoder", "paraling_encoder"):
        params = list(getattr(model, name).parameters())
        assert all(not p.requires_grad and p.grad is None for p in params)
    saved = load_file(str(exp / "model.safetensors"))
    for name in PROJECTORS:
        keys = [k for k in saved if k.startswith(name + ".")]
        assert len(keys) == 4 and all(not torch.equal(saved[k], start[k]) for k in keys), name
    assert prompts and set(prompts) == {model.audio_placeholder}
    assert model.audio_placeholder == "<audio><meta><|AUDIO|></meta><text><|AUDIO|></text></audio>"
    config = json.loads((exp / "config.json").read_text())
    assert config["paraling_encoder_config"]["model_type"] == "zipformer"
    again = AZeroS.from_pretrained(exp)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in saved.items())


def test_one_stage_whisper_trains_its_one_projector(setup, tmp_path):
    """The Table 6 Whisper row: a Whisper folder as the only encoder, one stage on the mix."""
    r = train.main(args(setup, tmp_path / "w", "--speech-encoder", setup["whisper"],
                        "--max-steps", "2"))
    model = r["model"]
    assert model.paraling_encoder is None and model.audio_placeholder == "<|AUDIO|>"
    assert train.trainable_names(model, "both") == ["speech_encoder_projector"]
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["speech_encoder_config"]["model_type"] == "whisper"
    assert config["paraling_encoder_config"] is None


def test_stage_values_and_errors(setup, tmp_path):
    assert train.parse_args(["--stage", "both", "--train", "x", "--exp", "e"]).stage == "both"
    assert train.parse_args(["--stage", "2", "--train", "x", "--exp", "e"]).stage == 2
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "3", "--train", "x", "--exp", "e"])
    with pytest.raises(train.TrainError, match="stage both needs --llm and --speech-encoder"):
        train.main(args(setup, tmp_path / "x"))
    model = AZeroS.from_components(setup["llm"], setup["speech"], setup["paraling"])
    model.set_stage("both")
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(PROJECTORS)
    with pytest.raises(ValueError, match="stage must be 1, 2 or 'both'"):
        model.set_stage("all")
