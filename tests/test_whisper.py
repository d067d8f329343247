"""whisper_encoder.py and the Whisper variant of paper Table 6: the log-mel front end, no padding
to 30 s, batches, loading and saving, and a whole model with a Whisper semantic encoder (train,
export, reload, generate). Tiny random Whisper: d_model 32, 2 layers, 80 mels, 1500 positions."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import llm
import train
import whisper_encoder as W
from model import AZeroS
from tiny import make_tiny_encoder_dir, make_tiny_llm_dir, make_tiny_whisper_dir, write_wav

EPS = torch.finfo(torch.float32).eps


def speech_like(seconds: float, seed: int = 0) -> torch.Tensor:
    """Tones with a syllable-rate envelope plus noise: a spectrum with structure, like speech."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    envelope = (1 + torch.sin(8 * math.pi * t)) / 2
    wave = 0.3 * torch.sin(2 * math.pi * (180 + 40 * seed) * t) * envelope
    return wave + 0.02 * torch.randn(t.shape, generator=g)


def fp32_bound(encoder, out: torch.Tensor, n_terms: int) -> float:
    """What float32 rounding alone can change in the encoder output when the same operations sum in
    another order (another matmul blocking, more masked keys). A dot product of n terms is within
    n * eps of its value relative to its scale (Higham, Sec. 3.1, eps in place of u = eps / 2 for
    margin); each layer adds such an error (the convolutions one more) and the final LayerNorm keeps
    the output's scale: (layers + 1) * n * eps * max|out|, n the longest sum in the computation."""
    return (len(encoder.encoder.layers) + 1) * n_terms * EPS * float(out.abs().max())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("whisper")
    return {
        "whisper": make_tiny_whisper_dir(root / "whisper", seed=0),
        "llm": make_tiny_llm_dir(root / "llm", seed=0),
        "zipformer": make_tiny_encoder_dir(root / "zipformer", seed=2),
    }


@pytest.fixture(scope="module")
def encoder(folders):
    return W.WhisperSpeechEncoder.from_pretrained(folders["whisper"])


# -------------------------------------------------------------------------------------------------
# Front end


def test_log_mel_matches_transformers_feature_extractor():
    """Our log-mel of an unpadded clip equals WhisperFeatureExtractor's (padding="longest" is no
    padding for one clip) within 1e-5, the agreement transformers states between its own numpy and
    torch versions. Padded to 30 s (its default, and the official generate()), only the frames
    whose 25-ms window reaches past the clip's end differ: the STFT sees zeros, not a reflection."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=80)
    for seconds, seed in ((3.0, 0), (1.2345, 1)):
        wave = speech_like(seconds, seed)
        ours, lens = W.log_mel([wave])
        n = len(wave) // W.HOP_LENGTH
        assert ours.shape == (1, n, 80) and lens.tolist() == [n]
        ref = fe(wave.numpy(), sampling_rate=16000, padding="longest", return_tensors="pt")
        ref = ref.input_features[0].T
        assert ref.shape == (n, 80)
        assert (ours[0] - ref).abs().max() < 1e-5  # measured 0: the same float32 operations
        padded = fe(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features[0].T
        inside = sum(1 for i in range(n) if i * W.HOP_LENGTH + W.N_FFT // 2 <= len(wave))
        assert padded.shape == (3000, 80) and n - inside <= 2
        assert (ours[0, :inside] - padded[:inside]).abs().max() < 1e-5


def test_log_mel_batch_is_each_clip_alone():
    waves = [speech_like(2.0, 0), speech_like(0.7, 1)]
    feats, lens = W.log_mel(waves)
    alone, _ = W.log_mel([waves[1]])
    assert lens.tolist() == [200, 70]
    assert torch.equal(feats[1, :70], alone[0]) and not feats[1, 70:].any()
    padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)  # the (B, N) + lengths form
    assert torch.equal(W.log_mel(padded, torch.tensor([32000, 11200]))[0], feats)
    with pytest.raises(ValueError, match="need 160 samples"):
        W.log_mel([torch.zeros(100)])


# -------------------------------------------------------------------------------------------------
# Encoder: no padding to 30 s, batches


def test_encoder_cuts_positions_instead_of_padding_to_30s(encoder):
    """A 3-s clip (300 frames) gives ceil(300 / 2) = 150 frames, not 1500; an odd length rounds up
    as the stride-2 convolution does. On a 30-s input ours equals transformers' own forward."""
    feats, lens = W.log_mel([speech_like(3.0), speech_like(3.01, 1)])
    with torch.no_grad():
        out, out_lens = encoder(feats, lens)
    assert lens.tolist() == [300, 301] and out_lens.tolist() == [150, 151]
    assert out.shape == (2, 151, 32)

    x = W.log_mel([speech_like(30.0, 2)])[0]
    assert x.shape == (1, 3000, 80)
    with torch.no_grad():
        ours, n = encoder(x, torch.tensor([3000]))
        ref = encoder.encoder(x.transpose(1, 2)).last_hidden_state  # transformers' forward
    assert n.tolist() == [1500] and ours.shape == ref.shape == (1, 1500, 32)
    assert (ours - ref).abs().max() <= fp32_bound(encoder, ref, 1500)  # measured 0
    with pytest.raises(ValueError, match="Make sure to pad"):
        encoder.encoder(x[:, :300].transpose(1, 2))  # why the forward is ours


def test_padded_utterance_gives_the_frames_it_gets_alone(encoder):
    """Padding is zeroed before both convolutions and masked out of attention, so a short clip in a
    batch gets the frames it gets alone. Without that (the official encoder has no mask) the frames
    change with the padding of the batch."""
    waves = [speech_like(3.0, 0), speech_like(1.27, 1), speech_like(0.41, 2)]  # 300, 127, 41 frames
    with torch.no_grad():
        batch, lens = encoder(*W.log_mel(waves))
        for i, w in enumerate(waves):
            alone, n = encoder(*W.log_mel([w]))
            assert lens[i] == n[0] == alone.shape[1]
            diff = (batch[i, : n[0]] - alone[0]).abs().max()
            assert diff <= fp32_bound(encoder, alone, 150)  # measured <= 4.8e-7, bound 1.5e-4
            assert not batch[i, n[0] :].any()
        x, lens = W.log_mel(waves)
        leaky, _ = encoder(x, torch.full_like(lens, 300))  # padding read as if it were speech
    assert (leaky[1, :64] - batch[1, :64]).abs().max() > 1e-2  # measured 0.04


# -------------------------------------------------------------------------------------------------
# Loading and saving


@pytest.mark.parametrize("kind", ["WhisperForConditionalGeneration", "WhisperModel"])
def test_loads_the_encoder_of_a_transformers_folder(tmp_path, kind):
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    folder = make_tiny_whisper_dir(tmp_path / kind, kind=kind, seed=5)
    ours = W.WhisperSpeechEncoder.from_pretrained(folder)
    ref = getattr(transformers, kind).from_pretrained(str(folder)).get_encoder().state_dict()
    assert ours.encoder.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in ours.encoder.state_dict().items())
    # save_pretrained writes transformers' WhisperEncoder folder, which the official code loads
    ours.save_pretrained(tmp_path / "enc")
    assert set(load_file(str(tmp_path / "enc" / "model.safetensors"))) == set(ref)
    official = WhisperEncoder.from_pretrained(str(tmp_path / "enc")).state_dict()
    assert all(torch.equal(v, official[k]) for k, v in ref.items())
    again = W.WhisperSpeechEncoder.from_pretrained(tmp_path / "enc").encoder.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in ref.items())


def test_float16_checkpoint_runs_in_float32_and_is_saved_in_float16(tmp_path):
    import transformers

    from tiny import tiny_whisper_config

    transformers.WhisperModel(tiny_whisper_config()).half().save_pretrained(str(tmp_path / "fp16"))
    enc = W.WhisperSpeechEncoder.from_pretrained(tmp_path / "fp16")
    assert enc.encoder.conv1.weight.dtype == torch.float32
    enc.save_pretrained(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    source = load_file(str(tmp_path / "fp16" / "model.safetensors"))
    assert all(
        v.dtype == torch.float16 and torch.equal(v, source[f"encoder.{k}"])
        for k, v in saved.items()
    )


def test_folder_errors_name_the_problem(tmp_path):
    from transformers import WhisperFeatureExtractor

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        W.WhisperSpeechEncoder.from_pretrained(tmp_path)
    # a feature extractor saved beside the model must be the front end we compute
    folder = make_tiny_whisper_dir(tmp_path / "w")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(str(folder))
    W.WhisperSpeechEncoder.from_pretrained(folder)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(str(folder))
    with pytest.raises(ValueError, match=r"config.json: \{'feature_size': 128\} differ"):
        W.WhisperSpeechEncoder.from_pretrained(folder)


# -------------------------------------------------------------------------------------------------
# The whole model with a Whisper semantic encoder


def test_model_with_whisper_encoder_saves_and_reloads(folders, tmp_path):
    """from_components with a Whisper folder: config.json records the encoder (transformers'
    WhisperConfig, model_type "whisper"; stacking rate 4 as the official config), speech_encoder/
    holds the encoder alone, and the reloaded model gives bit-identical logits and answers."""
    model = AZeroS.from_components(str(folders["llm"]), str(folders["whisper"]))
    wave = speech_like(2.0)
    feats = model.features([wave])
    x, lens = feats["speech"]
    assert lens.tolist() == [200] and x.shape[-1] == 80
    assert [s.shape[0] for s in model.audio_segments(feats)[0]] == [100 // 4]  # 50 Hz / 4

    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["speech_encoder_config"]["model_type"] == "whisper"
    assert config["speech_encoder_config"]["d_model"] == 32
    assert config["speech_encoder_projector_ds_rate"] == 4
    assert not (tmp_path / "m" / "speech_encoder").is_symlink()
    saved = load_file(str(tmp_path / "m" / "speech_encoder" / "model.safetensors"))
    assert set(saved) == set(model.speech_encoder.encoder.state_dict())

    again = AZeroS.from_pretrained(tmp_path / "m")
    assert isinstance(again.speech_encoder, W.WhisperSpeechEncoder)
    msgs = [[again.user_message("Describe."), {"role": "assistant", "content": "a cat"}]]
    a, b = model(msgs, model.features([wave])), again(msgs, again.features([wave]))
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["logits"], b["logits"])
    ask = [[model.user_message("Describe.")]]
    options = llm.GenerationOptions(8)
    assert model.generate([wave], ask, options) == again.generate([wave], ask, options)


def test_whisper_beside_a_zipformer_reads_two_front_ends(folders):
    """A Whisper semantic encoder with a Zipformer paralinguistic one: each reads its own front end
    (log-mel, Kaldi fbank), so each branch has its own (feats, feat_lens)."""
    import data

    model = AZeroS.from_components(
        str(folders["llm"]), str(folders["whisper"]), str(folders["zipformer"])
    )
    waves = [speech_like(1.5, 0), speech_like(0.9, 1)]
    feats = model.features(waves)
    assert set(feats) == {"speech", "paraling"}
    assert feats["speech"][1].tolist() == [150, 90] and feats["paraling"][1].tolist() == [150, 90]
    assert torch.equal(feats["paraling"][0], data.fbank(waves)[0])
    assert torch.equal(feats["speech"][0], W.log_mel(waves)[0])
    segments = model.audio_segments(feats)
    assert [[s.shape[0] for s in row] for row in segments] == [[9, 18], [5, 11]]  # (para, semantic)
    augmented = model.front_end(waves, augment=lambda f, n: f + 1)  # SpecAugment: each kind once
    assert all(torch.equal(augmented[b][0], feats[b][0] + 1) for b in feats)
    ask = [model.user_message("Who?")]
    both = model.generate(waves, [ask] * 2, llm.GenerationOptions(4))
    assert both == [model.generate([w], [ask], llm.GenerationOptions(4))[0] for w in waves]


def test_train_with_whisper_encoder_then_stage2_with_zipformer(folders, tmp_path):
    """train.py --speech-encoder <Whisper folder>: stage 1 trains (the loss falls), exports and
    reloads; stage 2 adds a Zipformer paralinguistic encoder on top of it."""
    rows = []
    for i in range(6):
        wav = write_wav(tmp_path / f"u{i}.wav", 0.6 + 0.1 * i, seed=i)
        rows.append(
            {
                "id": f"u{i}",
                "audio": str(wav),
                "duration": 0.6 + 0.1 * i,
                "text": f"u {i}",
                "response": ["cat", "dog", "sun"][i % 3],
                "truncated": False,
            }
        )
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [
        "--train",
        str(manifest),
        "--num-workers",
        "0",
        "--log-every",
        "1",
        "--warmup-steps",
        "1",
        "--lr",
        "1e-2",
        "--max-duration",
        "3",
    ]
    r = train.main(
        [
            "--stage",
            "1",
            "--llm",
            str(folders["llm"]),
            "--speech-encoder",
            str(folders["whisper"]),
            "--exp",
            str(tmp_path / "s1"),
            "--max-steps",
            "12",
            *common,
        ]
    )
    loss = [h["loss"] for h in r["history"] if "loss" in h]
    assert len(loss) == 12 and min(loss[-3:]) < loss[0]
    loaded = AZeroS.from_pretrained(tmp_path / "s1")
    assert isinstance(loaded.speech_encoder, W.WhisperSpeechEncoder)
    trained = r["model"].speech_encoder_projector.state_dict()
    reloaded = loaded.speech_encoder_projector.state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in trained.items())

    r2 = train.main(
        [
            "--stage",
            "2",
            "--init",
            str(tmp_path / "s1"),
            "--paraling-encoder",
            str(folders["zipformer"]),
            "--exp",
            str(tmp_path / "s2"),
            "--max-steps",
            "2",
            *common,
        ]
    )
    assert isinstance(r2["model"].speech_encoder, W.WhisperSpeechEncoder)
    config = json.loads((tmp_path / "s2" / "config.json").read_text())
    assert config["paraling_encoder_config"]["model_type"] == "zipformer"
    both = AZeroS.from_pretrained(tmp_path / "s2")
    assert both.generate(
        [speech_like(1.0)], [[both.user_message("Who?")]], llm.GenerationOptions(4)
    )
