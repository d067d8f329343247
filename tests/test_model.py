"""model.py: parity with the official AZeroS code, save/load, audio-token counts, stages, batched
generation.

Parity numbers come from tests/fixtures/azeros_tiny_expected (the official code run on
azeros_tiny_release, see its meta.json): LLM in float32, projector outputs rounded to float16 before
the splice, CPU.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import llm
from conftest import FIXTURES
from model import AZeroS
from tiny import cached_tiny_release, write_wav
from zipformer import output_lengths

RELEASE = FIXTURES / "azeros_tiny_release"
EXP = load_file(str(FIXTURES / "azeros_tiny_expected" / "expected.safetensors"))
META = json.loads((FIXTURES / "azeros_tiny_expected" / "meta.json").read_text())
WAV = FIXTURES / "fbank" / "signal1_16k_mono_float.wav"  # "signal 1" of meta.json runs.inputs
TOL = 1e-4
OFFICIAL_ENC = {
    "speech": (EXP["speech_encoder_out"], EXP["speech_encoder_out_lens"]),
    "paraling": (EXP["paraling_encoder_out"], EXP["paraling_encoder_out_lens"]),
}


@pytest.fixture(scope="module")
def official():
    torch.use_deterministic_algorithms(True)
    yield AZeroS.from_pretrained(RELEASE, dtype=torch.float32)
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def tiny():
    path = cached_tiny_release()
    return path, AZeroS.from_pretrained(path)


def prompt(model):
    return [model.user_message("Describe the audio.")]


def fixture_fbank(model) -> dict:
    """The fixture's fbank as the features of both encoders (both read one fbank)."""
    return {branch: (EXP["gen_x"], EXP["gen_x_lens"]) for branch in model.encoders()}


def greedy(model, segments, n_rows, return_logits=False):
    """Greedy ids (and step logits) from already projected audio, 16 new tokens like the fixture."""
    batch = llm.build_batch(
        model.llm, model.tokenizer, [prompt(model)] * n_rows, segments, training=False
    )
    options = llm.GenerationOptions(
        16, extra=dict(return_dict_in_generate=True, output_logits=True)
    )
    out = llm.generate_ids(model.llm, model.tokenizer, batch, options)
    return batch, out.sequences, torch.stack(out.logits, 1)


# --------------------------------------------------------------------------------------------------
# Parity with the official implementation


def test_parity_generate_from_fixture_features(official):
    segments = official.audio_segments(fixture_fbank(official))
    assert [s.shape[0] for s in segments[0]] == [8, 8]  # paralinguistic first, then semantic
    batch, ids, logits = greedy(official, segments, 1)
    assert torch.equal(batch.input_ids, EXP["gen_prompt_input_ids"])
    # our Zipformer differs from the official one by ~3e-6, so a few fp16-rounded audio values land
    # one fp16 step (2^-10 relative) away; text embeddings are exact
    assert torch.allclose(
        batch.inputs_embeds, EXP["gen_prompt_inputs_embeds"], rtol=2**-10, atol=1e-6
    )
    assert torch.equal(ids, EXP["gen_generated_ids"])
    assert (
        logits - EXP["gen_step_logits"]
    ).abs().max() < 1e-2  # measured 3.7e-3 on logits of size ~20


def fp16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of float16 numbers at |x|: 2^(e - 10) for |x| in [2^e, 2^(e+1)), 2^-24 below the
    smallest normal 2^-14 (float16 has a 10-bit mantissa)."""
    e = torch.floor(torch.log2(x.double().abs().clamp(min=2.0**-14)))
    return torch.pow(2.0, e - 10)


def test_parity_generate_from_official_encoder_outputs(official):
    # The LLM side alone, from the official encoder outputs. Text positions are rows of the
    # embedding table: exact. Audio positions are projector outputs rounded to float16 (as the
    # official code does): the fp32 matmul before that rounding may sum in another order on another
    # CPU (AVX2 vs AVX-512 kernels), and a value within a few fp32 ulps of an fp16 rounding midpoint
    # then rounds to the neighbouring fp16 number. So the bound is one fp16 ulp of the reference
    # value (an Intel AVX-512 Xeon measured 7.6e-6 = 2^-17, one ulp of a value near 0.01), not
    # float32 noise.
    batch, ids, logits = greedy(official, official.project(OFFICIAL_ENC), 1)
    expected = EXP["gen_prompt_inputs_embeds"]
    audio = batch.input_ids == official.audio_token_id
    diff = (batch.inputs_embeds - expected).abs()
    assert torch.equal(batch.inputs_embeds[~audio], expected[~audio])
    assert (diff[audio] <= fp16_ulp(expected[audio])).all()
    assert torch.equal(ids, EXP["gen_generated_ids"])
    assert (logits - EXP["gen_step_logits"]).abs().max() < TOL


def test_parity_batched_generate_from_official_encoder_outputs(official):
    # Our Zipformer is batch-invariant, the official one leaks padding into the shorter row, so the
    # padded-batch reference (bgen) is reproduced from the official encoder outputs.
    enc = {
        "speech": (EXP["bgen_speech_encoder_out"], EXP["bgen_speech_encoder_out_lens"]),
        "paraling": (EXP["bgen_paraling_encoder_out"], EXP["bgen_paraling_encoder_out_lens"]),
    }
    segments = official.project(enc)
    batch, ids, logits = greedy(official, segments, 2)
    assert torch.equal(batch.input_ids, EXP["bgen_prompt_input_ids"])
    assert torch.equal(batch.attention_mask, EXP["bgen_attention_mask"])
    assert torch.equal(ids, EXP["bgen_generated_ids"])
    assert (logits - EXP["bgen_step_logits"]).abs().max() < TOL


def test_parity_end_to_end_from_wav(official):
    wave = data.load_audio(WAV)
    msgs = [prompt(official)]
    texts = official.generate([wave], msgs, llm.GenerationOptions(16))
    assert texts == META["runs"]["a_generate"]["decoded_text_official_return"]
    # batched with the 0.8 s clip: row 0 as alone, row 1 = the official ids of that clip (alone and
    # batched)
    texts = official.generate([wave, wave[:12800]], msgs * 2, llm.GenerationOptions(16))
    assert texts == META["runs"]["c_batched_generate"]["decoded_text_official_return"]


@pytest.mark.parametrize("source", ["official_encoder_outputs", "our_encoders"])
def test_parity_training_forward(official, source):
    msgs = META["runs"]["b_forward"]["messages"]
    if (
        source == "our_encoders"
    ):  # fixture fbank through our Zipformers: a few fp16 steps differ (see above)
        out, tol, logit_tol = official(msgs, fixture_fbank(official)), 2e-4, 1e-2
    else:
        out, tol, logit_tol = official(msgs, encoder_outputs=OFFICIAL_ENC), TOL, TOL
    assert torch.equal(out["labels"], EXP["fwd_labels"])
    assert (
        abs(out["loss"].item() - EXP["fwd_loss"].item()) < tol
    )  # measured 7.6e-6 / 1.1e-4 (loss 34.6)
    assert out["acc"].item() == EXP["fwd_acc"].item() and out["num_tokens"].item() == 17
    pos = EXP["fwd_pred_positions"]  # the answer positions: the only ones forward heads
    assert torch.equal(out["labels"][0, 1:].ne(llm.IGNORE_INDEX).nonzero()[:, 0], pos)
    assert (
        out["logits"] - EXP["fwd_logits_at_pred_positions"]
    ).abs().max() < logit_tol  # 2.6e-3 ours
    assert torch.equal(out["logits"].argmax(-1), EXP["fwd_argmax_all_positions"][pos])
    assert abs(out["row_nll"][0].item() / 17 - out["loss"].item()) < 1e-5


def matmul_error_bound(projector, x: torch.Tensor) -> torch.Tensor:
    """A worst-case bound on the float32 rounding error of projector(x) (any summation order).

    A dot product of length n computed in floating point is within n*u*(|w|.|x|) of the exact value
    (Higham, Accuracy and Stability, Sec. 3.1; u = eps/2 is the unit roundoff). The first layer's
    error passes through ReLU (1-Lipschitz) and |W2|; with n = K1 + 1 and K2 + 1 terms (inputs plus
    bias) and eps in place of u (a factor 2 of margin) the bound on the output is (K1 + K2 + 2) *
    eps * (|W2| (|W1| |x| + |b1|) + |b2|)."""
    eps = torch.finfo(torch.float32).eps
    l1, l2 = projector.linear1, projector.linear2
    k = x.shape[0] // projector.ds_rate * projector.ds_rate
    stacked = x[:k].reshape(-1, l1.in_features).double().abs()
    h = stacked @ l1.weight.double().abs().T + l1.bias.double().abs()
    y = h @ l2.weight.double().abs().T + l2.bias.double().abs()
    return (l1.in_features + l2.in_features + 2) * eps * y


def test_projector_outputs_are_rounded_like_official(official):
    """Every audio value is a float16 number (the official code casts projector outputs to fp16),
    kept in the projector's fp32 (CPU autocast has no fp16 rules). Against the official outputs:
    before rounding, within the float32 matmul error bound; after rounding, within one fp16 ulp (a
    value that close to an fp16 rounding midpoint may round either way on another CPU; exact
    equality failed on an AVX-512 Xeon)."""
    rounded = official.project(OFFICIAL_ENC)[0]
    official.round_audio_to_fp16 = False
    try:
        unrounded = official.project(OFFICIAL_ENC)[0]
    finally:
        official.round_audio_to_fp16 = True
    branches = [
        ("paraling", official.paraling_encoder_projector),
        ("speech", official.speech_encoder_projector),
    ]
    for (name, projector), ours, ours32 in zip(branches, rounded, unrounded):
        ref32 = EXP[f"{name}_projector_out_fp32"][0][: len(ours)]
        assert ours.dtype == torch.float32 and torch.equal(ours, ours.half().float())
        bound = matmul_error_bound(
            projector, OFFICIAL_ENC[name][0][0, : int(OFFICIAL_ENC[name][1][0])]
        )
        assert ((ours32 - ref32).abs() <= bound).all(), name
        ref16 = ref32.half().float()
        assert ((ours - ref16).abs() <= fp16_ulp(ref16)).all(), name


# --------------------------------------------------------------------------------------------------
# Loading and saving


def test_save_load_round_trip_is_bit_identical(tiny, tmp_path):
    path, model = tiny
    model.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "llm").is_symlink()  # frozen parts linked, not rewritten
    assert set(load_file(str(tmp_path / "copy" / "model.safetensors"))) == {
        f"{p}_encoder_projector.linear{i}.{w}"
        for p in ("speech", "paraling")
        for i in (1, 2)
        for w in ("weight", "bias")
    }
    again = AZeroS.from_pretrained(tmp_path / "copy")
    enc = model.encode(model.features([torch.randn(16000) * 0.1]))
    for a, b in zip(model.project(enc)[0], again.project(enc)[0]):
        assert torch.equal(a, b)
    model.save_pretrained(tmp_path / "written", link_frozen=False)
    assert not (tmp_path / "written" / "llm").is_symlink()
    assert AZeroS.from_pretrained(tmp_path / "written").config == model.config


def test_loads_full_state_dict_and_pt(tiny, tmp_path):
    path, model = tiny
    copy = tmp_path / "full"
    shutil.copytree(path, copy)
    (copy / "model.safetensors").unlink()
    torch.save({"state_dict": model.state_dict()}, copy / "pretrained.pt")  # everything, as a .pt
    again = AZeroS.from_pretrained(copy)
    assert torch.equal(
        again.speech_encoder_projector.linear1.weight, model.speech_encoder_projector.linear1.weight
    )


def test_load_errors_name_the_problem(tiny, tmp_path):
    path, model = tiny
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "paraling_encoder")
    with pytest.raises(FileNotFoundError, match="paraling_encoder is missing"):
        AZeroS.from_pretrained(broken)
    shutil.copytree(path / "paraling_encoder", broken / "paraling_encoder")
    weights = load_file(str(broken / "model.safetensors"))
    weights["speech_encoder_projector.extra"] = torch.zeros(1)
    del weights["paraling_encoder_projector.linear2.bias"]
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing \['paraling_encoder_projector.linear2.bias'\].*extra"
    ):
        AZeroS.from_pretrained(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        AZeroS.from_pretrained(broken)


# --------------------------------------------------------------------------------------------------
# Audio tokens, stages, training, generation


def test_audio_token_counts_for_both_encoders(tiny):
    _, model = tiny
    feats = model.features([torch.randn(n) * 0.1 for n in (16000, 9000)])
    assert feats["speech"][0] is feats["paraling"][0]  # two Zipformers: one fbank, computed once
    augmented = []  # training's SpecAugment: one draw of masks for that one fbank
    model.front_end([torch.randn(9000) * 0.1], augment=lambda f, n: augmented.append(n) or f + 1)
    assert len(augmented) == 1
    lens = feats["speech"][1]
    expected = (output_lengths(lens) // 4).tolist()  # both tiny encoders share the 25 Hz frame rate
    segments = model.audio_segments(feats)
    assert [[s.shape[0] for s in row] for row in segments] == [[n, n] for n in expected]
    msgs = [[model.user_message("hi"), {"role": "assistant", "content": "ok"}]] * 2
    batch = llm.build_batch(model.llm, model.tokenizer, msgs, segments, training=True)
    assert (batch.input_ids == model.audio_token_id).sum(1).tolist() == [2 * n for n in expected]
    bad = [
        [{"role": "user", "content": llm.AUDIO_TOKEN}, {"role": "assistant", "content": "ok"}]
    ] * 2
    with pytest.raises(
        ValueError, match=r"row 0: the prompt has 1 <\|AUDIO\|> placeholder\(s\) but .* 2 segment"
    ):
        model(bad, feats)


def test_stages_train_one_projector(tiny):
    _, model = tiny
    feats = model.features([torch.randn(12000) * 0.1])
    try:
        model.set_stage(1)
        assert model.audio_placeholder == llm.AUDIO_TOKEN  # stage 1: semantic branch alone
        assert model.trainable_parameters() == list(model.speech_encoder_projector.parameters())
        model.train()
        assert model.speech_encoder_projector.training and not model.llm.training
        assert not model.speech_encoder.training and not model.paraling_encoder.training
        record = data.Record(
            id="u", audio="x.wav", duration=0.75, text="t", response="An answer", truncated=True
        )
        msgs = [model.training_messages(record)]
        assert (
            msgs[0][0] == {"role": "user", "content": llm.AUDIO_TOKEN} and msgs[0][1]["truncated"]
        )
        model(msgs, feats)["loss"].backward()
        assert model.speech_encoder_projector.linear1.weight.grad is not None
        assert model.paraling_encoder_projector.linear1.weight.grad is None
        model.set_stage(2)
        assert model.trainable_parameters() == list(model.paraling_encoder_projector.parameters())
        # a _ssp row's system message shaped its target only; training never shows it (official
        # trainer)
        record.system, record.instruction = "Be kind.", "Describe."
        msgs = model.training_messages(record)
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        assert msgs[0]["content"] == f"{model.audio_placeholder} Describe."
        enc = model.encode(feats)  # encoder outputs can be cached and passed instead of features
        loss = model([msgs], encoder_outputs=enc)["loss"]
        assert loss.requires_grad and torch.allclose(loss, model([msgs], feats)["loss"])
    finally:
        model.set_stage(None)
        model.eval()
        model.zero_grad(set_to_none=True)


def test_batched_generation_equals_single(tiny, tmp_path):
    _, model = tiny
    waves = [
        data.load_audio(write_wav(tmp_path / f"{i}.wav", s, seed=i))
        for i, s in enumerate((1.7, 0.6, 1.1))
    ]
    msgs = [prompt(model)] * 3
    batched = model.generate(waves, msgs, llm.GenerationOptions(12))
    single = [model.generate([w], msgs[:1], llm.GenerationOptions(12))[0] for w in waves]
    assert batched == single and len(set(batched)) == 3


def test_text_only_generation(tiny):
    _, model = tiny
    text = model.generate(None, [[{"role": "user", "content": "hello"}]], llm.GenerationOptions(5))
    assert isinstance(text[0], str)


def test_stage1_release_without_paraling_encoder():
    model = AZeroS.from_pretrained(cached_tiny_release(paraling=False))
    assert model.paraling_encoder is None and model.config["paraling_encoder_config"] is None
    assert model.audio_placeholder == llm.AUDIO_TOKEN
    feats = model.features([torch.randn(8000) * 0.1])
    assert [len(row) for row in model.audio_segments(feats)] == [1]
    assert isinstance(
        model.generate(None, [prompt(model)], llm.GenerationOptions(3), feats=feats)[0], str
    )
    with pytest.raises(ValueError, match="the audio or its feats, not both"):
        model.generate([torch.zeros(8000)], [prompt(model)], feats=feats)
    with pytest.raises(ValueError, match="stage 2"):
        model.set_stage(2)
