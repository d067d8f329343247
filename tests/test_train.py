"""train.py: overfitting, exact resume, encoder cache, stage 2 freezing, torchrun DDP, clear errors.

Everything runs on CPU with tiny random models built here (no network). Most runs call `train.main`
in-process (the import of torch/transformers is paid once); the DDP test launches a real
`torchrun --nproc_per_node=2` with the gloo backend.
"""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT
from support import spec_augment, train_support
from tiny import copy_tokenizer, make_tiny_encoder_dir, tiny_qwen2, write_wav

WORDS = ["cat", "dog", "sun", "tree"]


def make_llm_dir(path, hidden: int = 64, seed: int = 0):
    """A random Qwen2 LLM whose logits are moderate (weights N(0, 0.1), lm_head N(0, 0.3)).

    A frozen random LLM can only be steered through its input; with default init (0.02) the logits
    are too flat for any input to matter, and with very large weights the loss starts far away. This
    middle ground makes "the projector alone halves the loss" a fair, fast check."""
    torch.manual_seed(seed)
    model = tiny_qwen2(hidden)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3 if "lm_head" in name else 0.1)
    model.save_pretrained(str(path))
    copy_tokenizer(path)
    return path


def write_manifest(path, n, seconds=lambda i: 0.8 + 0.05 * i, response=True):
    wav_dir = path.parent / f"{path.stem}_wav"
    wav_dir.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        wav = write_wav(wav_dir / f"u{i}.wav", seconds(i), seed=i)
        row = {
            "id": f"u{i}",
            "audio": str(wav),
            "duration": round(seconds(i), 4),
            "text": f"utterance {i}",
            "meta": {"gender": "male" if i % 2 else "female", "emotion": "happy"},
        }
        if response:
            row.update(mode="sift_s", response=WORDS[(7 * i) % 4], truncated=False)
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_setup(root, with_train16: bool = True) -> dict:
    """A tiny LLM, two tiny encoders and the training manifests, in one folder (shared with other
    tests)."""
    setup = {
        "root": root,
        "llm": str(make_llm_dir(root / "llm")),
        "speech": str(make_tiny_encoder_dir(root / "speech_encoder", seed=1)),
        "paraling": str(make_tiny_encoder_dir(root / "paraling_encoder", seed=2)),
        # 8 short utterances, 2 per batch with --max-duration 1.6: 4 batches per epoch
        "train8": str(write_manifest(root / "train8.jsonl", 8, seconds=lambda i: 0.6 + 0.02 * i)),
    }
    if with_train16:
        setup["train16"] = str(write_manifest(root / "train16.jsonl", 16))
    return setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("train"))


def stage1_args(s, exp, *extra, train="train8"):
    return [
        "--stage",
        "1",
        "--llm",
        s["llm"],
        "--speech-encoder",
        s["speech"],
        "--train",
        s.get(train, train),
        "--exp",
        str(exp),
        "--num-workers",
        "0",
        "--log-every",
        "1",
        "--warmup-steps",
        "2",
        "--lr",
        "1e-2",
        *extra,
    ]


def stage2_args(s, init, exp, *extra, paraling=None):
    """A stage-2 run from the stage-1 model folder `init` on the 8-row manifest."""
    return [
        "--stage",
        "2",
        "--init",
        str(init),
        "--paraling-encoder",
        paraling or s["paraling"],
        "--train",
        s["train8"],
        "--exp",
        str(exp),
        "--num-workers",
        "0",
        *extra,
    ]


def losses(result):
    return [h["loss"] for h in result["history"] if "loss" in h]


def projector_state(exp):
    return load_file(str(exp / "model.safetensors"))


# -------------------------------------------------------------------------------------------------
# Small pieces


def test_parse_train_spec():
    assert train.parse_train_spec("a.jsonl") == ("a.jsonl", 1.0)
    assert train.parse_train_spec("a.jsonl:0.5") == ("a.jsonl", 0.5)
    assert train.parse_train_spec("/x:y/a.jsonl") == ("/x:y/a.jsonl", 1.0)


def test_lr_schedule_warmup_then_linear_decay():
    f = [train.lr_factor(s, warmup=4, decay_steps=14, min_ratio=0.1) for s in range(20)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear warm-up
    assert f[4] == pytest.approx(1.0) and f[9] == pytest.approx(0.55)  # linear decay from the peak
    assert f[14:] == pytest.approx([0.1] * 6)  # then flat at min_lr


def test_eden2_schedule_is_the_official_formula():
    """lr(b) = 1e-3 * (1 + (b/7500)^2)^-0.5 * w(b), w(b) = 0.5 + 0.5 b/500 below b = 500, else 1
    (Auden's Eden2 as the official config builds it), evaluated by hand."""
    expected = {
        0: 1e-3 * 0.5,
        250: 1e-3 * (1 + (250 / 7500) ** 2) ** -0.5 * 0.75,
        500: 1e-3 / math.sqrt(1 + 1 / 15**2),
        7500: 1e-3 / math.sqrt(2),
        30000: 1e-3 / math.sqrt(17),
    }
    for step, lr in expected.items():
        assert train.eden2(step, 1e-3) == pytest.approx(lr, rel=1e-12), step
    args = train.parse_args(
        ["--stage", "1", "--train", "x", "--exp", "x"]
    )  # the defaults are official
    assert (args.schedule, args.lr, args.lr_batches, args.warmup_steps) == (
        "eden2",
        1e-3,
        7500,
        500,
    )
    assert (args.weight_decay, args.grad_clip, args.max_length, args.average_period) == (
        0.0,
        0.0,
        512,
        200,
    )
    assert args.spec_augment and train.learning_rate(250, args, 0) == pytest.approx(
        expected[250], rel=1e-12
    )


def masked(x: torch.Tensor, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames, bins) that a SpecAugment mask set to `fill` throughout (random input is never
    constant)."""
    hit = x == fill
    return hit.all(1), hit.all(0)


def test_spec_augment_lhotse_bounds_over_many_draws():
    """Time masks: at most 15% of an utterance's frames, on 2-10 s clips; frequency masks: at most 2
    x 27 bins; both drawn with probability 0.9 (one SpecAugment per utterance, padding untouched).
    """
    aug = dataclasses.replace(
        spec_augment.SPEC_AUGMENT, time_warp=0
    )  # warping moves values: masks measured alone
    gen = torch.Generator().manual_seed(0)
    fractions, bins, untouched = [], [], 0
    for i in range(300):
        n = 200 + (i * 37) % 801  # 2..10 s of 10 ms frames
        feats = torch.randn(2, 1000, 80)
        lens = torch.tensor([n, 1000])
        out = aug(feats, lens, gen)
        assert torch.equal(out[0, n:], feats[0, n:])
        x = out[0, :n]
        frames, freq = masked(x, feats[0, :n].mean())
        fractions.append(float(frames.float().mean()))
        bins.append(int(freq.sum()))
        untouched += torch.equal(out[0], feats[0])
    assert max(fractions) <= 0.15 and max(bins) <= 2 * 27
    assert max(fractions) > 0.10 and max(bins) > 27  # the masks do reach near their limits
    assert 0.05 < untouched / 300 < 0.17  # p = 0.9: about one utterance in ten is left alone


def test_spec_augment_time_warp():
    """Warping (probability 0.9) changes a 5 s ramp but keeps its ends and its length; clips of at
    most 2 x 80 + 1 frames are never warped (Lhotse's rule)."""
    aug = dataclasses.replace(spec_augment.SPEC_AUGMENT, freq_masks=0, time_masks=0, p=1.0)
    gen = torch.Generator().manual_seed(0)
    ramp = torch.arange(500, dtype=torch.float32)[None, :, None].expand(1, 500, 80).contiguous()
    changed = 0
    for _ in range(50):
        out = aug(ramp, torch.tensor([500]), gen)
        assert out.shape == ramp.shape
        assert abs(float(out[0, 0, 0])) < 1 and abs(float(out[0, -1, 0]) - 499) < 1
        changed += not torch.equal(out, ramp)
    assert changed >= 45  # unchanged only when the drawn target equals the centre (1 in 161)
    short = torch.randn(1, 161, 80)
    assert torch.equal(aug(short, torch.tensor([161]), gen), short)


def test_spec_augment_refuses_the_encoder_cache(setup, tmp_path):
    with pytest.raises(train.TrainError, match="add --no-spec-augment to use the cache"):
        train.main(stage1_args(setup, tmp_path / "x", "--cache-encoders", str(tmp_path / "c")))


def test_checkpoints_atomic_and_rotated(tmp_path):
    for step in range(1, 6):
        train_support.save_checkpoint(tmp_path, {"step": step}, keep_last=2, rank=0)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000004.pt", "step-00000005.pt"]  # no temp files left, last 2 kept
    assert train_support.find_checkpoint(tmp_path, "latest").name == "step-00000005.pt"


# -------------------------------------------------------------------------------------------------
# Errors that must be readable


def test_empty_manifest_and_missing_responses(setup, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(train.TrainError, match=f"training manifest {empty} is empty"):
        train.main(stage1_args(setup, tmp_path / "e", train=str(empty)))
    raw = write_manifest(tmp_path / "raw.jsonl", 3, response=False)
    # the command line prints one line, no traceback
    assert train.cli(stage1_args(setup, tmp_path / "e", train=str(raw))) == 1
    err = capsys.readouterr().err
    assert (
        "3 of 3 rows have no 'response'" in err
        and "generate_targets.py" in err
        and "Traceback" not in err
    )


def test_out_of_memory_message(setup):
    class OOMModel:
        use_paraling = False

        def front_end(self, waves, wave_lens, device=None, augment=None):
            return {"speech": (torch.zeros(len(wave_lens), 300, 80), wave_lens // 160)}

        def encode(self, feats):
            raise torch.OutOfMemoryError("CUDA out of memory")

    args = train.parse_args(stage1_args(setup, "x", "--max-duration", "100"))
    batch = {
        "waves": [torch.zeros(16000), torch.zeros(32000)],
        "wave_lens": torch.tensor([16000, 32000]),
        "records": [],
    }
    with pytest.raises(train.TrainError) as e:
        train.run_batch(OOMModel(), None, batch, args, torch.device("cpu"), None, None, train=True)
    msg = str(e.value)
    assert "2 utterances" in msg and "3.0 s of audio" in msg and "--max-duration (now 100)" in msg


# -------------------------------------------------------------------------------------------------
# Training runs


def test_overfit_halves_loss_and_only_projector_learns(setup, tmp_path):
    """60 steps on 16 utterances (one batch each): the loss must at least halve. Also: the frozen
    parts never require or receive gradients, metrics.jsonl has the logged numbers, the export is
    the release layout and loads back with the trained weights."""
    exp = tmp_path / "exp"
    r = train.main(
        stage1_args(
            setup,
            exp,
            "--max-steps",
            "60",
            "--no-spec-augment",
            "--cache-encoders",
            str(tmp_path / "cache"),
            "--valid",
            setup["train8"],
            "--valid-every",
            "30",
            train="train16",
        )
    )
    loss = losses(r)
    assert len(loss) == 60 and loss[-1] <= 0.5 * loss[0], (loss[0], loss[-1])

    model = r["model"]
    for name in ("llm", "speech_encoder"):
        for p in getattr(model, name).parameters():
            assert not p.requires_grad and p.grad is None
    assert all(p.requires_grad for p in model.speech_encoder_projector.parameters())

    lines = [json.loads(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]
    step_line = lines[0]
    for key in (
        "loss",
        "acc",
        "lr",
        "samples_per_s",
        "audio_s_per_s",
        "tokens_per_s",
        "padding_eff",
    ):
        assert key in step_line
    valid = [x for x in lines if "valid_loss" in x]
    assert [x["step"] for x in valid] == [30, 60] and valid[1]["valid_loss"] < valid[0][
        "valid_loss"
    ]

    from model import AZeroS

    assert (
        (exp / "config.json").exists()
        and (exp / "llm").exists()
        and (exp / "speech_encoder").exists()
    )
    loaded = AZeroS.from_pretrained(exp)
    for k, v in model.speech_encoder_projector.state_dict().items():
        assert torch.equal(loaded.speech_encoder_projector.state_dict()[k], v)


def test_resume_is_exact(setup, tmp_path):
    """3 steps, then resume for 3 more == 6 steps in one go (grad accumulation 2, SpecAugment on,
    weight averaging every 2 steps, so the sampler position, optimizer, average and RNG states all
    have to come back): the same losses, the same last weights, bit-identical averaged weights."""
    common = (
        "--max-duration",
        "1.6",
        "--grad-accum",
        "2",
        "--average-period",
        "2",
        "--save-every",
        "2",
        "--keep-last",
        "3",
    )
    full = train.main(stage1_args(setup, tmp_path / "full", "--max-steps", "6", *common))
    first = train.main(stage1_args(setup, tmp_path / "split", "--max-steps", "3", *common))
    assert first["step"] == 3
    second = train.main(
        stage1_args(setup, tmp_path / "split", "--max-steps", "6", "--resume", *common)
    )
    assert second["step"] == 6
    assert losses(first) + losses(second) == pytest.approx(losses(full), abs=1e-6)
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert ckpts == ["step-00000003.pt", "step-00000004.pt", "step-00000006.pt"]
    a, b = (
        torch.load(tmp_path / run / "checkpoints" / "step-00000006.pt", weights_only=True)
        for run in ("full", "split")
    )
    last_a, last_b = (
        a["projectors"]["speech_encoder_projector"],
        b["projectors"]["speech_encoder_projector"],
    )
    assert max(float((last_a[k] - last_b[k]).abs().max()) for k in last_a) < 1e-6
    assert a["average"]["updates"] == b["average"]["updates"] == 3
    assert all(
        torch.equal(a["average"]["weights"][k], b["average"]["weights"][k])
        for k in a["average"]["weights"]
    )
    exported = projector_state(tmp_path / "full"), projector_state(tmp_path / "split")
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
    # the loop sets Eden2's rate for update b (from 1) before that update, as the official trainer
    assert [h["lr"] for h in full["history"] if "lr" in h] == [
        train.eden2(b, 1e-2, 7500, 2) for b in range(1, 7)
    ]


def test_exported_weights_are_the_uniform_average(setup, tmp_path):
    """With --average-period 2, six steps: the average (float64, in the checkpoint) is the mean of
    the weights after steps 2, 4 and 6, and model.safetensors holds it (rounded to float32) rather
    than the last weights, as the official export holds model_avg. The official update rounds
    weights * (2/s) to float32 before the float64 sum: each of the 3 terms is off by at most half an
    fp32 ulp of itself."""
    exp = tmp_path / "avg"
    train.main(
        stage1_args(
            setup,
            exp,
            "--max-steps",
            "6",
            "--max-duration",
            "1.6",
            "--average-period",
            "2",
            "--save-every",
            "2",
            "--keep-last",
            "3",
        )
    )
    ckpt = {
        s: torch.load(exp / "checkpoints" / f"step-{s:08d}.pt", weights_only=True)
        for s in (2, 4, 6)
    }
    snaps = {s: c["projectors"]["speech_encoder_projector"] for s, c in ckpt.items()}
    avg = ckpt[6]["average"]["weights"]
    exported = projector_state(exp)
    eps = torch.finfo(torch.float32).eps
    for k, v in snaps[6].items():
        mean = sum(snaps[s][k].double() for s in (2, 4, 6)) / 3
        got = avg[f"speech_encoder_projector.{k}"]
        assert got.dtype == torch.float64
        assert (
            (got - mean).abs() <= 3 * eps * max(float(snaps[s][k].abs().max()) for s in snaps)
        ).all(), k
        assert torch.equal(exported[f"speech_encoder_projector.{k}"], got.float()), k
        assert not torch.equal(exported[f"speech_encoder_projector.{k}"], v)  # not the last weights


def test_ssp_rows_train_exactly_like_sp_rows(setup, tmp_path):
    """The official trainer builds only `user: <audio> {instruction}` and `assistant: response`; the
    dialog system message of a `_ssp` row only shaped its target. One step on rows labelled sift_ssp
    (with that system message) and on the same rows labelled sift_sp: bit-identical loss and
    projector."""
    from generate_targets import DIALOG_SYSTEM

    rows = [json.loads(x) for x in open(setup["train8"])]
    results = []
    for mode, system in (("sift_ssp", DIALOG_SYSTEM), ("sift_sp", "")):
        manifest = tmp_path / f"{mode}.jsonl"
        manifest.write_text(
            "".join(json.dumps({**r, "mode": mode, "system": system}) + "\n" for r in rows)
        )
        exp = tmp_path / mode
        results.append(
            (
                losses(
                    train.main(
                        stage1_args(
                            setup,
                            exp,
                            "--max-steps",
                            "1",
                            "--max-duration",
                            "1.6",
                            train=str(manifest),
                        )
                    )
                ),
                projector_state(exp),
            )
        )
    (loss_ssp, w_ssp), (loss_sp, w_sp) = results
    assert loss_ssp == loss_sp and len(loss_sp) == 1
    assert w_ssp.keys() == w_sp.keys() and all(torch.equal(w_ssp[k], w_sp[k]) for k in w_sp)


def test_cached_encoders_equal_uncached(setup, tmp_path, monkeypatch):
    """Three epochs with and without --cache-encoders: the same losses; the cached run runs the
    encoders only in the first epoch. One duration bucket, so later epochs pair utterances
    differently than the epoch that filled the cache (cached outputs must not depend on their
    batch-mates)."""
    from model import AZeroS

    calls = []
    encode = AZeroS.encode
    monkeypatch.setattr(
        AZeroS, "encode", lambda self, f: calls.append(len(f["speech"][1])) or encode(self, f)
    )
    common = ("--max-duration", "1.6", "--epochs", "3", "--num-buckets", "1", "--no-spec-augment")
    plain = train.main(stage1_args(setup, tmp_path / "plain", *common))
    n_plain, calls[:] = len(calls), []
    cached = train.main(
        stage1_args(setup, tmp_path / "cached", *common, "--cache-encoders", str(tmp_path / "c"))
    )
    assert n_plain == 12 and len(calls) == 4  # 4 batches per epoch; encoders in epoch 1 only
    assert len(losses(plain)) == 12
    # Epoch 1 runs the same encoder batches in both runs: bit-identical. Later epochs pair the
    # utterances differently, so the uncached run pads them differently: its frames then differ
    # from the cached ones by float32 rounding (batch invariance holds to rounding, not bits), and
    # Adam's normalised steps carry such differences into the weights at up to lr per step. The
    # losses must agree far closer than any real cache error (a wrong or stale frame changes the
    # loss in the first decimal): 1e-4 relative is ~840 float32 ulps (2^-23) of slack for that
    # drift.
    assert losses(cached)[:4] == losses(plain)[:4]
    assert losses(cached) == pytest.approx(losses(plain), rel=1e-4)
    assert list((tmp_path / "c").glob("*.safetensors")) and (tmp_path / "c" / "meta.json").exists()


def test_bf16_autocast_on_cpu(setup, tmp_path, monkeypatch):
    """--precision bf16 runs the LLM and encoders under bf16 autocast on CPU too (fast on
    AVX512-BF16/AMX CPUs): the logits come out in bf16, the loss is close to fp32's but not equal
    (bf16 really ran), and the projector's master weights stay fp32. The cache is keyed by
    precision, so fp32 never reads bf16 frames."""
    from model import AZeroS

    seen = []
    forward = AZeroS.forward
    monkeypatch.setattr(
        AZeroS,
        "forward",
        lambda self, *a, **k: (
            seen.append(
                torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            )
            or forward(self, *a, **k)
        ),
    )
    common = ("--max-steps", "3", "--max-duration", "1.6", "--no-spec-augment")
    fp32 = train.main(
        stage1_args(
            setup,
            tmp_path / "fp32",
            *common,
            "--precision",
            "fp32",
            "--cache-encoders",
            str(tmp_path / "cache"),
        )
    )
    assert seen == [None] * 3
    seen.clear()
    bf16 = train.main(stage1_args(setup, tmp_path / "bf16", *common, "--precision", "bf16"))
    assert seen == [torch.bfloat16] * 3
    a, b = losses(fp32), losses(bf16)
    assert a[0] != b[0] and abs(a[0] - b[0]) < 0.05 * a[0], (a, b)
    assert all(
        p.dtype == torch.float32 for p in bf16["model"].speech_encoder_projector.parameters()
    )
    with pytest.raises(train.TrainError, match="different encoder weights or precision"):
        train.main(
            stage1_args(
                setup,
                tmp_path / "bf16b",
                *common,
                "--precision",
                "bf16",
                "--cache-encoders",
                str(tmp_path / "cache"),
            )
        )


@pytest.fixture(scope="module")
def stage1_model(setup, tmp_path_factory):
    exp = tmp_path_factory.mktemp("stage1")
    train.main(stage1_args(setup, exp, "--max-steps", "2", "--max-duration", "3.2"))
    return exp


def test_stage2_freezes_semantic_projector(setup, stage1_model, tmp_path, monkeypatch):
    before = {}
    build = train.build_model

    def spy(args, device):
        model = build(args, device)
        before.update({k: v.clone() for k, v in model.state_dict().items() if "projector" in k})
        return model

    monkeypatch.setattr(train, "build_model", spy)
    exp = tmp_path / "stage2"
    r = train.main(
        stage2_args(
            setup,
            stage1_model,
            exp,
            *("--max-steps", "3", "--max-duration", "3.2", "--warmup-steps", "1", "--lr", "1e-2"),
        )
    )
    stage1 = projector_state(stage1_model)
    after = projector_state(exp)
    for k, v in stage1.items():  # loaded from stage 1, untouched by stage 2, bit for bit
        assert torch.equal(before[k], v) and torch.equal(after[k], v), k
    para = [k for k in after if k.startswith("paraling_encoder_projector.")]
    assert len(para) == 4 and all(not torch.equal(after[k], before[k]) for k in para)
    model = r["model"]
    for name in ("llm", "speech_encoder", "paraling_encoder", "speech_encoder_projector"):
        for p in getattr(model, name).parameters():
            assert not p.requires_grad and p.grad is None
    # the export is a two-encoder release
    assert json.loads((exp / "config.json").read_text())["paraling_encoder_config"] is not None


def test_stage2_llm_width_mismatch_is_explained(setup, stage1_model, tmp_path):
    other = make_llm_dir(tmp_path / "llm48", hidden=48)
    with pytest.raises(train.TrainError, match="maps to width 64, but the LLM has hidden size 48"):
        train.main(stage2_args(setup, stage1_model, tmp_path / "x", "--llm", str(other)))


def test_torchrun_two_cpu_ranks(setup, tmp_path):
    """A real `torchrun --nproc_per_node=2` (gloo): ranks end with identical weights (train.py
    checks it with an all-reduce and logs the spread) and see disjoint utterances that together
    cover each epoch."""
    exp = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "train.py"),
        *stage1_args(
            setup,
            exp,
            "--max-steps",
            "4",
            "--max-duration",
            "1.6",
            "--grad-accum",
            "2",
            "--log-batches",
            "--device",
            "cpu",
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # own process group: if anything hangs, the timeout kills torchrun AND its worker processes
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    lines = [json.loads(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]
    end = lines[-1]
    assert end["event"] == "end" and end["world_size"] == 2 and end["rank_weight_max_diff"] == 0.0
    seen = [
        [json.loads(x) for x in (exp / f"batches.rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert len(seen[0]) == len(seen[1]) == 8  # 4 steps x 2 micro-batches on each rank
    for epoch in (0, 1):
        ids = [{i for b in s if b["epoch"] == epoch for i in b["ids"]} for s in seen]
        assert ids[0] and not ids[0] & ids[1]
        assert ids[0] | ids[1] == {f"u{i}" for i in range(8)}
    assert (exp / "model.safetensors").exists()
