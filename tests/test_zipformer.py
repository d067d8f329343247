"""zipformer.py against the official Zipformer2 numbers (tests/fixtures/zipformer_small) and
state-dict layout."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from zipformer import MIN_INPUT_FRAMES, ZipformerConfig, ZipformerEncoder, output_lengths

SMALL = FIXTURES / "zipformer_small"
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return ZipformerEncoder.from_pretrained(SMALL)


@pytest.fixture(scope="module")
def data():
    return load_file(str(SMALL / "inputs.safetensors")), load_file(
        str(SMALL / "expected.safetensors")
    )


def run_alone(model, x, x_lens):
    """Each utterance on its own, cut to its length: the padding-free reference."""
    with torch.no_grad():
        return [
            model(x[i : i + 1, : int(n)], x_lens[i : i + 1])[0][0] for i, n in enumerate(x_lens)
        ]


def max_err_valid(batched, singles, out_lens):
    return max(
        (batched[i, : int(n)] - s).abs().max().item()
        for i, (s, n) in enumerate(zip(singles, out_lens))
    )


def test_strict_load_and_official_state_dict(model):
    official = load_file(str(SMALL / "model.safetensors"))
    ours = model.state_dict()
    assert set(ours) == set(official)
    assert all(ours[k].shape == official[k].shape for k in official)
    assert not model.training
    assert model.output_dim == 80


def test_single_utterances_match_official(model, data):
    inputs, expected = data
    singles = run_alone(model, inputs["x"], inputs["x_lens"])
    for i, s in enumerate(singles):
        ref = expected[f"encoder_out_single_{i}"][0]
        assert s.shape == ref.shape
        assert (s - ref).abs().max().item() < TOL


def test_batched_matches_official_where_official_is_padding_free(model, data):
    inputs, expected = data
    with torch.no_grad():
        out, lens = model(inputs["x"], inputs["x_lens"])
    assert lens.dtype == torch.long and lens.tolist() == expected["encoder_out_lens"].tolist() == [
        58,
        46,
        14,
    ]
    assert out.shape == expected["encoder_out"].shape
    # Row 0 is the longest utterance: no padding, so official batched == official single == ours.
    assert (out[0] - expected["encoder_out"][0]).abs().max().item() < TOL
    # Shorter rows equal the official *single-utterance* outputs (the official batch leaks padding
    # into them).
    for i in (1, 2):
        n = int(lens[i])
        assert (out[i, :n] - expected[f"encoder_out_single_{i}"][0]).abs().max().item() < TOL
        assert out[i, n:].abs().max().item() == 0.0  # frames past the length are zeroed


def test_batch_invariance_fixture(model, data):
    inputs, _ = data
    with torch.no_grad():
        out, lens = model(inputs["x"], inputs["x_lens"])
    assert max_err_valid(out, run_alone(model, inputs["x"], inputs["x_lens"]), lens) < TOL


def test_batch_invariance_random_lengths(model):
    g = torch.Generator().manual_seed(3)
    # The shortest accepted input (9 frames -> 1 embedded frame -> 1 output frame) plus 4 random
    # lengths.
    x_lens = torch.cat(
        [torch.tensor([MIN_INPUT_FRAMES]), torch.randint(10, 230, (4,), generator=g)]
    )
    embed_lens = (x_lens - 7) // 2
    assert (x_lens % 2 == 1).any() and (
        embed_lens % 2 == 1
    ).any()  # odd lengths exercise the downsampling
    # Padding holds random junk and the tensor is longer than the longest utterance: neither may
    # matter.
    x = torch.randn(5, 240, 80, generator=g) * 2 - 8
    with torch.no_grad():
        out, lens = model(x, x_lens)
    assert lens.tolist() == output_lengths(x_lens).tolist()
    assert out.shape[1] == int(lens.max())
    assert max_err_valid(out, run_alone(model, x, x_lens), lens) < TOL


def test_output_lengths_formula():
    x_lens = torch.arange(MIN_INPUT_FRAMES, 400)
    assert output_lengths(x_lens).tolist() == [
        (((n - 7) // 2) + 1) // 2 for n in range(MIN_INPUT_FRAMES, 400)
    ]


def test_too_short_input_raises(model):
    x = torch.randn(2, 20, 80)
    with pytest.raises(ValueError, match=f"at least {MIN_INPUT_FRAMES} fbank frames"):
        model(x, torch.tensor([20, MIN_INPUT_FRAMES - 1]))
    with torch.no_grad():
        out, lens = model(x[:1, :MIN_INPUT_FRAMES], torch.tensor([MIN_INPUT_FRAMES]))
    assert out.shape == (1, 1, 80) and lens.tolist() == [1]


def test_bf16_autocast_cpu_runs_close_to_fp32(model, data):
    inputs, expected = data
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, lens = model(inputs["x"], inputs["x_lens"])
    assert torch.isfinite(out).all()
    ref = expected["encoder_out_single_0"][0]
    err = (out[0].float() - ref).abs()
    # bf16 has ~3 significant digits; outputs are O(1..8): loose, "same function" check only.
    assert err.mean().item() < 0.1 and err.max().item() < 1.0


def test_backward_works(model, data):
    inputs, _ = data
    x = inputs["x"][:, :120].clone().requires_grad_(True)
    out, lens = model(x, torch.tensor([120, 100, 61]))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_save_pretrained_roundtrip_and_composite_checkpoint(model, data, tmp_path):
    inputs, _ = data
    model.save_pretrained(tmp_path / "enc")
    cfg = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert cfg["model_type"] == "zipformer"
    assert (
        ZipformerConfig.from_dict(cfg)
        == model.config
        == ZipformerConfig.from_json(SMALL / "config.json")
    )
    assert set(load_file(str(tmp_path / "enc" / "model.safetensors"))) == set(model.state_dict())
    reloaded = ZipformerEncoder.from_pretrained(tmp_path / "enc")

    # A composite checkpoint as written by a DDP-wrapped speech LLM, as a .pt file, without
    # model_batch_count.
    comp = tmp_path / "composite"
    comp.mkdir()
    (comp / "config.json").write_text(json.dumps({"model_type": "x", "speech_encoder_config": cfg}))
    state = {
        f"module.speech_encoder.{k}": v
        for k, v in model.state_dict().items()
        if k != "model_batch_count"
    }
    state["module.projector.weight"] = torch.zeros(3)
    torch.save({"state_dict": state}, comp / "pretrained.pt")
    from_composite = ZipformerEncoder.from_pretrained(comp / "pretrained.pt")

    x, x_lens = inputs["x"], inputs["x_lens"]
    with torch.no_grad():
        ref = model(x, x_lens)[0]
        assert torch.equal(reloaded(x, x_lens)[0], ref)
        assert torch.equal(from_composite(x, x_lens)[0], ref)


def test_bare_encoder_prefix_file(model, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file(
        {f"encoder.{k}": v.contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "w.safetensors"),
    )
    loaded = ZipformerEncoder.from_pretrained(tmp_path / "w.safetensors", dtype=torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64


@pytest.mark.parametrize("name", ["speech_encoder", "paraling_encoder"])
def test_release_encoders_load(name):
    enc = ZipformerEncoder.from_pretrained(FIXTURES / "azeros_tiny_release" / name)
    with torch.no_grad():
        out, lens = enc(torch.randn(2, 50, 80), torch.tensor([50, 31]))
    assert out.shape == (2, 11, enc.output_dim) and lens.tolist() == [11, 6]


def test_tta_m10_state_dict_shapes():
    ref = json.loads((FIXTURES / "zipformer_tta_m10_shapes.json").read_text())
    config = ZipformerConfig.from_dict(ref["config"])
    assert config == ZipformerConfig.tta_m10()
    with torch.device("meta"):  # 152M parameters: shapes only, nothing allocated
        enc = ZipformerEncoder(config)
    shapes = {k: list(v.shape) for k, v in enc.state_dict().items()}
    assert list(shapes.items()) == list(ref["state_dict"].items())  # same keys, shapes and order
    assert sum(p.numel() for p in enc.parameters()) == ref["num_parameters"]
    assert enc.output_dim == ref["encoder_out_dim"] == 768
