"""Readiness for a first GPU run, checked on the CPU (issue 24): no silent CPU fallback, a rank's
GPU from LOCAL_RANK only, the straight-through fp16 rounding, the vLLM flags and the backend a
resumed output was written by. What needs a real GPU is in bench/ and docs, not here."""
import os
import sys
import types

import pytest
import torch

import generate_targets as gt
from model import round_to_fp16
from support import checks, model_support, train_support
from support import targets_support as support

QWEN7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
              tie_word_embeddings=False)


def test_parameter_estimate_of_qwen7b():
    # per layer: q,o 3584x3584 twice, k,v 3584x512 twice, gate/up/down 3 x 3584x18944; plus the
    # untied embedding and head, 2 x 152064x3584
    layer = 2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944
    assert model_support.estimate_parameters(QWEN7B) == 28 * layer + 2 * 152064 * 3584


def test_large_llm_on_an_unasked_cpu_is_one_line():
    n = model_support.estimate_parameters(QWEN7B)
    with pytest.raises(checks.CheckError, match=r"7\.62B parameters and would run on the CPU "
                       r"\(.*\); pass --device cpu"):
        checks.cpu_fallback(n, None, "cpu", "--llm Qwen/Qwen2.5-7B-Instruct")
    checks.cpu_fallback(n, "cpu", "cpu", "--llm x")  # asked for: allowed
    checks.cpu_fallback(100_000_000, None, "cpu", "--llm x")  # small: allowed
    assert checks.pick_device(None) == "cpu"  # the conftest hides CUDA


def test_train_refuses_a_large_llm_folder_on_cpu(tmp_path):
    (tmp_path / "config.json").write_text(__import__("json").dumps(
        {**QWEN7B, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    args = types.SimpleNamespace(device=None, llm=str(tmp_path), gguf_file=None, init=None)
    with pytest.raises(train_support.TrainError, match="7.62B parameters"):
        train_support.check_device(args, torch.device("cpu"))
    args.device = "cpu"
    train_support.check_device(args, torch.device("cpu"))


def test_torchrun_rank_device_comes_from_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(train_support.TrainError, match="each rank uses cuda:LOCAL_RANK"):
        train_support.setup_distributed("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(train_support.TrainError, match="LOCAL_RANK 1 but only 1 CUDA"):
        train_support.setup_distributed("cuda")


def test_fp16_rounding_keeps_the_value_and_passes_the_gradient():
    y = torch.tensor([1e-3, 0.1234567, -3.3333333, 70000.0, 1e-9], requires_grad=True)
    out = round_to_fp16(y)
    # the forward value is exactly the fp16 rounding (70000 overflows fp16 to inf, as officially)
    assert torch.equal(out.detach(), y.detach().to(torch.float16).to(torch.float32))
    g = torch.tensor([1e-8, 1e-6, 3.0, 1.0, 1e-8])  # 1e-8 is below fp16's smallest subnormal
    out.backward(g)
    assert torch.equal(y.grad, g)  # unchanged: a differentiable cast gives 0 for 1e-8
    z = y.detach().clone().requires_grad_(True)
    z.to(torch.float16).to(torch.float32).backward(g)
    assert z.grad[0] == 0 and z.grad[1] != g[1]  # what the old cast did


def fake_vllm(monkeypatch, calls):
    class LLM:
        def __init__(self, **kw):
            calls["init"] = kw

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)


def test_vllm_flags_reach_the_engine(monkeypatch):
    calls = {}
    fake_vllm(monkeypatch, calls)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(support, "use_vllm", lambda backend, device: True)
    options = gt.VLLMOptions(None, 2, 0.5, 4096)
    backend = gt.make_backend("sift_s", "Qwen/Qwen2.5-7B-Instruct", backend="vllm",
                              device="cuda:3", vllm=options)
    kw = calls["init"]
    assert (kw["tensor_parallel_size"], kw["gpu_memory_utilization"], kw["max_model_len"]) == (
        2, 0.5, 4096)
    assert kw["trust_remote_code"] is False and backend.name == "vllm"
    import os
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"  # vLLM's workers see that GPU only


def test_vllm_backend_choice_is_explicit(monkeypatch):
    monkeypatch.setattr(support.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(checks.CheckError, match="vLLM is not installed"):
        support.use_vllm("vllm")
    assert support.use_vllm("auto") is False
    monkeypatch.setattr(support.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(checks.CheckError, match="runs on GPUs only"):
        support.use_vllm("vllm", "cpu")
    assert support.use_vllm("auto") is False  # installed, but CUDA does not work (conftest)


def test_parser_checks_vllm_flags():
    base = ["--mode", "sift_s", "--in", "a.jsonl", "--out", "o.jsonl"]
    for flag, value in (("--gpu-memory-utilization", "1.5"), ("--tensor-parallel-size", "0")):
        with pytest.raises(SystemExit):
            gt.parse_args(base + [flag, value])


def test_resume_refuses_another_backend(tmp_path):
    import json
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"u{i}", "audio": "a.wav", "duration": 1.0,
                                       "text": f"hello {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    gt.run([str(src)], out, "tsit_s", gt.TranscriptBackend(), progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["transcript"] * 3
    other = gt.TranscriptBackend()
    other.name = "hf"
    with pytest.raises(checks.CheckError,
                       match="written by the 'transcript' backend, this run uses 'hf'"):
        gt.run([str(src)], out, "tsit_s", other, progress=False)
    built = []  # a factory is called only once the output is locked
    gt.run([str(src)], out, "tsit_s", lambda: built.append(1) or gt.TranscriptBackend(),
           progress=False)
    assert built == [1]


def test_inference_runs_the_audio_side_in_the_training_precision(monkeypatch):
    """from_pretrained(precision="bf16"): fbank on the model's device, encoders and projectors
    under bf16 autocast (what training ran on CUDA). On the CPU this checks the code path."""
    import data
    from model import AZeroS
    from tiny import cached_tiny_release

    model = AZeroS.from_pretrained(cached_tiny_release(paraling=False), device="cpu",
                                   precision="bf16")
    assert model.precision == "bf16"
    seen, devices = [], []
    fbank = data.fbank
    monkeypatch.setattr(data, "fbank", lambda *a, **k: devices.append(k.get("device"))
                        or fbank(*a, **k))
    encode = model.speech_encoder.forward
    monkeypatch.setattr(model.speech_encoder, "forward", lambda *a, **k: seen.append(
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        or encode(*a, **k))
    wave = 0.1 * torch.randn(16000)
    model.generate([wave], [[model.user_message("hi")]],
                   __import__("llm").GenerationOptions(max_new_tokens=2))
    assert seen == [torch.bfloat16] and devices == [torch.device("cpu")]
    fp32 = AZeroS.from_pretrained(cached_tiny_release(paraling=False), device="cpu")
    assert fp32.precision == "fp32"  # auto on the CPU


def test_gpu_smoke_dry_run_on_cpu():
    """bench/gpu_smoke.py's checks run end to end on the CPU at tiny sizes: every row ok."""
    import subprocess

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "bench.gpu_smoke", "--dry-run"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": "tests"}, capture_output=True, text=True,
                          timeout=300)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == ["cuda", "step_7b", "pipeline", "nccl", "encoders", "batching"]
    assert all(r.split("|")[2].strip() in ("ok", "skipped (dry run)") for r in rows), rows


def saved_bytes(fn):
    """Bytes autograd keeps for the backward pass while fn() runs forward: every tensor packed by
    a saved-tensor hook (distinct storages), plus the inputs a checkpoint holds for its recompute
    (also saved through these hooks, by torch.utils.checkpoint)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_checkpointed_llm_same_loss_and_gradients_less_memory():
    """Checkpointing the eval-mode LLM's decoder layers: the loss is bit-identical (the same
    forward), the gradients equal to within 4 fp32 ulps of their largest value (the recompute runs
    the same kernels on the same inputs; the slack only allows a reduction split differently), and
    what autograd holds between forward and backward shrinks."""
    import llm
    from tiny import tiny_qwen2

    torch.manual_seed(0)
    lm = llm.freeze(tiny_qwen2(hidden=64, layers=4))
    x0 = torch.randn(2, 40, 64)
    mask = torch.ones(2, 40, dtype=torch.long)

    def run():
        x = x0.clone().requires_grad_(True)
        out, nbytes = saved_bytes(lambda: lm.base_model(inputs_embeds=x, attention_mask=mask,
                                                        use_cache=False).last_hidden_state)
        loss = out.pow(2).mean()
        loss.backward()
        return loss.detach(), x.grad, nbytes

    loss_a, grad_a, bytes_a = run()
    assert llm.checkpoint_layers(lm) == 4 and not lm.training
    loss_b, grad_b, bytes_b = run()
    assert torch.equal(loss_a, loss_b)
    eps = torch.finfo(torch.float32).eps
    assert (grad_a - grad_b).abs().max() <= 4 * eps * grad_a.abs().max()
    assert bytes_b < bytes_a / 2, (bytes_a, bytes_b)


def test_train_with_grad_checkpointing_matches(tmp_path):
    """train.py --grad-checkpointing: the same losses and projector weights as without (the same
    forward; gradients to within a few fp32 ulps, carried by Adam over 3 steps: 1e-5 relative)."""
    from safetensors.torch import load_file

    import train
    from test_train import build_setup, losses, stage1_args

    s = build_setup(tmp_path / "s", with_train16=False)
    common = ("--max-steps", "3", "--max-duration", "1.6", "--no-spec-augment", "--device", "cpu")
    plain = train.main(stage1_args(s, tmp_path / "a", *common))
    ckpt = train.main(stage1_args(s, tmp_path / "b", *common, "--grad-checkpointing"))
    assert losses(plain)[0] == losses(ckpt)[0]
    assert losses(ckpt) == pytest.approx(losses(plain), rel=1e-5)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(
        str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_llm_loads_straight_to_its_device(tmp_path, monkeypatch):
    """The LLM's weights go to the device inside from_pretrained (device_map), not into host RAM
    first and then .to(device) (15 GB of host memory per rank for a 7B LLM): the call gets the
    device, for a model built from components and for a release folder."""
    import llm
    from model import AZeroS
    from tiny import cached_tiny_release, make_tiny_llm_dir

    seen, load = [], llm.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(llm.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.append(k.get("device_map")) or load(*a, **k))
    lm, _ = llm.load_llm(make_tiny_llm_dir(tmp_path / "llm"), device="cpu")
    assert seen == [{"": torch.device("cpu")}]
    assert {p.device for p in lm.parameters()} == {torch.device("cpu")}
    AZeroS.from_pretrained(cached_tiny_release(), device="cpu")
    assert seen[-1] == {"": torch.device("cpu")}
    llm.load_llm(tmp_path / "llm")  # no device: transformers' own default placement
    assert seen[-1] is None
