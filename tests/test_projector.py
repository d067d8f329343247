"""Projector: parameter count, output shape/lengths, and that stacking is frame-order preserving."""

import torch

from projector import Projector


def test_parameter_count_matches_paper_config():
    # d=768 (Zipformer), k=4, D=3584 (Qwen2.5-7B): 768*4*3584 + 3584 + 3584*3584 + 3584
    p = Projector(768, 3584, ds_rate=4)
    assert sum(t.numel() for t in p.parameters()) == 23_862_272
    assert [n for n, _ in p.named_parameters()] == [
        "linear1.weight",
        "linear1.bias",
        "linear2.weight",
        "linear2.bias",
    ]


def test_output_lengths_drop_incomplete_groups():
    p = Projector(6, 10, ds_rate=4)
    x = torch.randn(3, 19, 6)  # 19 frames: 3 trailing frames cannot form a group
    out, lens = p(x, torch.tensor([19, 8, 3]))
    assert out.shape == (3, 4, 10)
    assert lens.tolist() == [4, 2, 0]


def test_stacking_order_is_time_major():
    # With identity-like weights the first output vector must be frames 0..3 concatenated in order.
    d, k = 3, 4
    p = Projector(d, d * k, ds_rate=k)
    with torch.no_grad():
        p.linear1.weight.copy_(torch.eye(d * k))
        p.linear1.bias.zero_()
        p.linear2.weight.copy_(torch.eye(d * k))
        p.linear2.bias.zero_()
    x = torch.arange(1, 1 + 8 * d, dtype=torch.float32).reshape(1, 8, d)
    out, _ = p(x, torch.tensor([8]))
    assert torch.equal(out[0, 0], x[0, :4].reshape(-1))
    assert torch.equal(out[0, 1], x[0, 4:8].reshape(-1))


def test_loads_official_projector_weights():
    # The tiny official release stores both projectors at the root; they must load strictly.
    import json

    from safetensors.torch import load_file

    from conftest import FIXTURES

    root = FIXTURES / "azeros_tiny_release"
    sd = load_file(str(root / "model.safetensors"))
    cfg = json.loads((root / "config.json").read_text())
    llm_dim = json.loads((root / "llm" / "config.json").read_text())["hidden_size"]
    for name, enc in [
        ("speech_encoder", "speech_encoder_config"),
        ("paraling_encoder", "paraling_encoder_config"),
    ]:
        sub = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(f"{name}_projector.")}
        d = max(cfg[enc]["encoder_dim"])
        p = Projector(d, llm_dim, ds_rate=cfg[f"{name}_projector_ds_rate"])
        p.load_state_dict(sub, strict=True)
