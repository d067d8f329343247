"""train.py: overfitting, exact resume, encoder cache, stage 2 freezing, torchrun DDP, clear errors.

Everything runs on CPU with tiny random models built here (no network). Most runs call `train.main`
in-process (the import of torch/transformers is paid once); the DDP test launches a real
`torchrun --nproc_per_node=2` with the gloo backend.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT
from tiny import copy_tokenizer, make_tiny_encoder_dir, tiny_qwen2, write_wav

WORDS = ["cat", "dog", "sun", "tree"]


def make_llm_dir(path, hidden: int = 64, seed: int = 0):
    """A random Qwen2 LLM whose logits are moderate (weights N(0, 0.1), lm_head N(0, 0.3)).

    A frozen random LLM can only be steered through its input; with default init (0.02) the logits are
    too flat for any input to matter, and with very large weights the loss starts far away. This middle
    ground makes "the projector alone halves the loss" a fair, fast check."""
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
        row = {"id": f"u{i}", "audio": str(wav), "duration": round(seconds(i), 4), "text": f"utterance {i}",
               "meta": {"gender": "male" if i % 2 else "female", "emotion": "happy"}}
        if response:
            row.update(mode="sift_s", response=WORDS[(7 * i) % 4], truncated=False)
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "root": root,
        "llm": str(make_llm_dir(root / "llm")),
        "speech": str(make_tiny_encoder_dir(root / "speech_encoder", seed=1)),
        "paraling": str(make_tiny_encoder_dir(root / "paraling_encoder", seed=2)),
        "train16": str(write_manifest(root / "train16.jsonl", 16)),
        # 8 short utterances, 2 per batch with --max-duration 1.6: 4 batches per epoch
        "train8": str(write_manifest(root / "train8.jsonl", 8, seconds=lambda i: 0.6 + 0.02 * i)),
    }


def stage1_args(s, exp, *extra, train="train8"):
    return ["--stage", "1", "--llm", s["llm"], "--speech-encoder", s["speech"], "--train", s.get(train, train),
            "--exp", str(exp), "--num-workers", "0", "--log-every", "1", "--warmup-steps", "2", "--lr", "1e-2", *extra]


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


def test_spec_augment_masks_only_valid_frames_and_is_reproducible():
    feats = torch.randn(2, 50, 80)
    feats[1, 30:] = -23.0
    lens = torch.tensor([50, 30])
    a = train.spec_augment(feats, lens, torch.Generator().manual_seed(0))
    b = train.spec_augment(feats, lens, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, feats)
    assert torch.equal(a[1, 30:], feats[1, 30:])  # padding untouched


def test_checkpoints_atomic_and_rotated(tmp_path):
    for step in range(1, 6):
        train.save_checkpoint(tmp_path, {"step": step}, keep_last=2, rank=0)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000004.pt", "step-00000005.pt"]  # no temp files left, last 2 kept
    assert train.find_checkpoint(tmp_path, "latest").name == "step-00000005.pt"


# -------------------------------------------------------------------------------------------------
# Errors that must be readable


def test_empty_manifest_and_missing_responses(setup, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(train.TrainError, match=f"training manifest {empty} is empty"):
        train.main(stage1_args(setup, tmp_path / "e", train=str(empty)))
    raw = write_manifest(tmp_path / "raw.jsonl", 3, response=False)
    monkeypatch.setattr(sys, "argv", ["train.py", *stage1_args(setup, tmp_path / "e", train=str(raw))])
    with pytest.raises(SystemExit) as e:
        train.cli()  # the command line prints one line, no traceback
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "3 of 3 rows have no 'response'" in err and "generate_targets.py" in err and "Traceback" not in err


def test_out_of_memory_message(setup):
    class OOMModel:
        use_paraling = False

        def front_end(self, waves, wave_lens, device=None):
            return torch.zeros(len(wave_lens), 300, 80), wave_lens // 160

        def encode(self, feats, feat_lens):
            raise torch.OutOfMemoryError("CUDA out of memory")

    args = train.parse_args(stage1_args(setup, "x", "--max-duration", "100"))
    batch = {"waves": [torch.zeros(16000), torch.zeros(32000)], "wave_lens": torch.tensor([16000, 32000]),
             "records": []}
    with pytest.raises(train.TrainError) as e:
        train.run_batch(OOMModel(), None, batch, args, torch.device("cpu"), None, None, train=True)
    msg = str(e.value)
    assert "2 utterances" in msg and "3.0 s of audio" in msg and "--max-duration (now 100)" in msg


# -------------------------------------------------------------------------------------------------
# Training runs


def test_overfit_halves_loss_and_only_projector_learns(setup, tmp_path):
    """60 steps on 16 utterances (one batch each): the loss must at least halve. Also: the frozen parts
    never require or receive gradients, metrics.jsonl has the logged numbers, the export is the release
    layout and loads back with the trained weights."""
    exp = tmp_path / "exp"
    r = train.main(stage1_args(setup, exp, "--max-steps", "60", "--cache-encoders", str(tmp_path / "cache"),
                               "--valid", setup["train8"], "--valid-every", "30", train="train16"))
    loss = losses(r)
    assert len(loss) == 60 and loss[-1] <= 0.5 * loss[0], (loss[0], loss[-1])

    model = r["model"]
    for name in ("llm", "speech_encoder"):
        for p in getattr(model, name).parameters():
            assert not p.requires_grad and p.grad is None
    assert all(p.requires_grad for p in model.speech_encoder_projector.parameters())

    lines = [json.loads(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]
    step_line = lines[0]
    for key in ("loss", "acc", "lr", "samples_per_s", "audio_s_per_s", "tokens_per_s", "padding_eff"):
        assert key in step_line
    valid = [x for x in lines if "valid_loss" in x]
    assert [x["step"] for x in valid] == [30, 60] and valid[1]["valid_loss"] < valid[0]["valid_loss"]

    from model import AZeroS

    assert (exp / "config.json").exists() and (exp / "llm").exists() and (exp / "speech_encoder").exists()
    loaded = AZeroS.from_pretrained(exp)
    for k, v in model.speech_encoder_projector.state_dict().items():
        assert torch.equal(loaded.speech_encoder_projector.state_dict()[k], v)


def test_resume_is_exact(setup, tmp_path):
    """3 steps, then resume for 3 more == 6 steps in one go (grad accumulation 2, SpecAugment on, so the
    sampler position, optimizer, scheduler and RNG states all have to come back)."""
    common = ("--max-duration", "1.6", "--grad-accum", "2", "--spec-augment", "--decay-steps", "6",
              "--save-every", "2", "--keep-last", "2")
    full = train.main(stage1_args(setup, tmp_path / "full", "--max-steps", "6", *common))
    first = train.main(stage1_args(setup, tmp_path / "split", "--max-steps", "3", *common))
    assert first["step"] == 3
    second = train.main(stage1_args(setup, tmp_path / "split", "--max-steps", "6", "--resume", *common))
    assert second["step"] == 6
    assert losses(first) + losses(second) == pytest.approx(losses(full), abs=1e-6)
    a, b = projector_state(tmp_path / "full"), projector_state(tmp_path / "split")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert ckpts == ["step-00000004.pt", "step-00000006.pt"]


def test_ssp_rows_train_exactly_like_sp_rows(setup, tmp_path):
    """The official trainer builds only `user: <audio> {instruction}` and `assistant: response`; the dialog
    system message of a `_ssp` row only shaped its target. One step on rows labelled sift_ssp (with that
    system message) and on the same rows labelled sift_sp: bit-identical loss and projector."""
    from generate_targets import DIALOG_SYSTEM

    rows = [json.loads(x) for x in open(setup["train8"])]
    results = []
    for mode, system in (("sift_ssp", DIALOG_SYSTEM), ("sift_sp", "")):
        manifest = tmp_path / f"{mode}.jsonl"
        manifest.write_text("".join(json.dumps({**r, "mode": mode, "system": system}) + "\n" for r in rows))
        exp = tmp_path / mode
        results.append((losses(train.main(stage1_args(setup, exp, "--max-steps", "1", "--max-duration", "1.6",
                                                      train=str(manifest)))), projector_state(exp)))
    (loss_ssp, w_ssp), (loss_sp, w_sp) = results
    assert loss_ssp == loss_sp and len(loss_sp) == 1
    assert w_ssp.keys() == w_sp.keys() and all(torch.equal(w_ssp[k], w_sp[k]) for k in w_sp)


def test_cached_encoders_equal_uncached(setup, tmp_path, monkeypatch):
    """Three epochs with and without --cache-encoders: the same losses; the cached run runs the encoders
    only in the first epoch. One duration bucket, so later epochs pair utterances differently than the
    epoch that filled the cache (cached outputs must not depend on their batch-mates)."""
    from model import AZeroS

    calls = []
    encode = AZeroS.encode
    monkeypatch.setattr(AZeroS, "encode", lambda self, f, n: calls.append(len(n)) or encode(self, f, n))
    common = ("--max-duration", "1.6", "--epochs", "3", "--num-buckets", "1")
    plain = train.main(stage1_args(setup, tmp_path / "plain", *common))
    n_plain, calls[:] = len(calls), []
    cached = train.main(stage1_args(setup, tmp_path / "cached", *common, "--cache-encoders", str(tmp_path / "c")))
    assert n_plain == 12 and len(calls) == 4  # 4 batches per epoch; encoders in epoch 1 only
    assert len(losses(plain)) == 12
    assert losses(cached) == pytest.approx(losses(plain), abs=1e-5)
    assert list((tmp_path / "c").glob("*.safetensors")) and (tmp_path / "c" / "meta.json").exists()


def test_bf16_autocast_on_cpu(setup, tmp_path, monkeypatch):
    """--precision bf16 runs the LLM and encoders under bf16 autocast on CPU too (fast on AVX512-BF16/AMX
    CPUs): the logits come out in bf16, the loss is close to fp32's but not equal (bf16 really ran), and the
    projector's master weights stay fp32. The cache is keyed by precision, so fp32 never reads bf16 frames."""
    from model import AZeroS

    seen = []
    forward = AZeroS.forward
    monkeypatch.setattr(AZeroS, "forward", lambda self, *a, **k: seen.append(torch.get_autocast_dtype("cpu")
                                                                             if torch.is_autocast_enabled("cpu")
                                                                             else None) or forward(self, *a, **k))
    common = ("--max-steps", "3", "--max-duration", "1.6")
    fp32 = train.main(stage1_args(setup, tmp_path / "fp32", *common, "--precision", "fp32",
                                  "--cache-encoders", str(tmp_path / "cache")))
    assert seen == [None] * 3
    seen.clear()
    bf16 = train.main(stage1_args(setup, tmp_path / "bf16", *common, "--precision", "bf16"))
    assert seen == [torch.bfloat16] * 3
    a, b = losses(fp32), losses(bf16)
    assert a[0] != b[0] and abs(a[0] - b[0]) < 0.05 * a[0], (a, b)
    assert all(p.dtype == torch.float32 for p in bf16["model"].speech_encoder_projector.parameters())
    with pytest.raises(train.TrainError, match="different encoder weights or precision"):
        train.main(stage1_args(setup, tmp_path / "bf16b", *common, "--precision", "bf16",
                               "--cache-encoders", str(tmp_path / "cache")))


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
    r = train.main(["--stage", "2", "--init", str(stage1_model), "--paraling-encoder", setup["paraling"],
                    "--train", setup["train8"], "--exp", str(exp), "--num-workers", "0", "--max-steps", "3",
                    "--max-duration", "3.2", "--warmup-steps", "1", "--lr", "1e-2"])
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
        train.main(["--stage", "2", "--init", str(stage1_model), "--llm", str(other), "--paraling-encoder",
                    setup["paraling"], "--train", setup["train8"], "--exp", str(tmp_path / "x"), "--num-workers", "0"])


def test_torchrun_two_cpu_ranks(setup, tmp_path):
    """A real `torchrun --nproc_per_node=2` (gloo): ranks end with identical weights (train.py checks it with
    an all-reduce and logs the spread) and see disjoint utterances that together cover each epoch."""
    exp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *stage1_args(setup, exp, "--max-steps", "4", "--max-duration", "1.6",
                                                "--grad-accum", "2", "--log-batches")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # own process group: if anything hangs, the timeout kills torchrun AND its worker processes
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
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
    seen = [[json.loads(x) for x in (exp / f"batches.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 8  # 4 steps x 2 micro-batches on each rank
    for epoch in (0, 1):
        ids = [{i for b in s if b["epoch"] == epoch for i in b["ids"]} for s in seen]
        assert ids[0] and not ids[0] & ids[1]
        assert ids[0] | ids[1] == {f"u{i}" for i in range(8)}
    assert (exp / "model.safetensors").exists()
