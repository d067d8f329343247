"""The first GPU run in one short offline script (issue 24): does the code run, fit, use the GPU?

Each check prints one row of a table (what, result, numbers). Nothing is downloaded: models are
random (the 7B step) or the test suite's tiny ones (tests/tiny.py).

  cuda        CUDA visible and working (checks.cuda_problem), the GPU's name and memory
  step_7b     one forward + backward of a Qwen2.5-7B-size LLM (random bf16 weights) through
              inputs_embeds, as training runs it: peak memory and MFU (model FLOPs 4 N per token:
              forward and activation gradients, no weight gradients for a frozen LLM)
  pipeline    tiny stage 1 -> resume -> stage 2 -> infer, all through the real entry points
  nccl        DDP's backend: a process group of one rank and an all-reduce
  encoders    Zipformer and Whisper (tiny, random) under bf16 autocast vs fp32: max relative diff
  batching    batched vs one-at-a-time greedy generation: rows with the same answer

    bash bench/gpu_smoke.sh               # on one GPU, under 10 minutes
    PYTHONPATH=tests python -m bench.gpu_smoke --dry-run   # the same code on the CPU, tiny sizes
                                                           # (the test suite runs this)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from support import checks

QWEN7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, intermediate_size=18944, vocab_size=152064)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=608)
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16; MFU is relative to it


def check_cuda(device, dry):
    if dry:
        return "skipped (dry run)", ""
    problem = checks.cuda_problem()
    if problem:
        raise RuntimeError(problem)
    p = torch.cuda.get_device_properties(device)
    return "ok", f"{p.name}, {p.total_memory / 2**30:.0f} GiB"


def check_step_7b(device, dry, length=512):
    """train.py's default --max-tokens as rows of `length` tokens (on the CPU: 4 rows), with the
    fp32 logits and cross-entropy of every position, as if all were supervised: the worst case
    the budget was sized for (docs/gpu.md)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from support import model_support, train_support

    dims = TINY if dry else QWEN7B
    dtype = torch.float32 if dry else torch.bfloat16
    rows = 4 if dry else train_support.DEFAULT_MAX_TOKENS // length
    with torch.device(device):
        lm = Qwen2ForCausalLM(Qwen2Config(**dims, tie_word_embeddings=False)).to(dtype).eval()
    lm.requires_grad_(False)
    n = model_support.per_token_parameters(lm)
    x = torch.randn(rows, length, dims["hidden_size"], device=device, dtype=dtype,
                    requires_grad=True)
    mask = torch.ones(rows, length, dtype=torch.long, device=device)
    targets = torch.randint(dims["vocab_size"], (rows * (length - 1),), device=device)
    times = []
    for _ in range(3):  # the first is warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        h = lm.base_model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
        logits = lm.get_output_embeddings()(h[:, :-1]).flatten(0, 1).float()
        torch.nn.functional.cross_entropy(logits, targets).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    dt = min(times[1:])
    flops = 4 * n * rows * length
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return "ok", (f"{n / 1e9:.2f}B params, {rows}x{length} tokens, {dt * 1e3:.0f} ms, peak "
                  f"{mem:.1f} GiB, MFU {flops / dt / PEAK_BF16_FLOPS:.1%}")


def check_pipeline(device, dry):
    """tiny stage 1 (2 steps) -> resume to 3 -> stage 2 (2 steps) -> infer, on `device`."""
    import infer
    import train
    from test_train import build_setup, stage1_args, stage2_args

    tmp = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    s = build_setup(tmp, with_train16=False)
    dev = ["--device", device.type]
    train.main(stage1_args(s, tmp / "s1", "--max-steps", "2", "--max-duration", "3.2", *dev))
    r = train.main(stage1_args(s, tmp / "s1", "--max-steps", "3", "--max-duration", "3.2",
                               "--resume", *dev))
    assert r["step"] == 3, r["step"]
    train.main(stage2_args(s, tmp / "s1", tmp / "s2", "--max-steps", "2",
                           "--max-duration", "3.2", *dev))
    wav = next((tmp / "train8_wav").glob("*.wav"))
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        answers = infer.main([str(wav), "Describe it.", "--model", str(tmp / "s2"),
                              "--max-new-tokens", "4", *dev])
    assert len(answers) == 1, answers
    return "ok", f"stage 1 -> resume -> stage 2 -> infer on {device.type}"


def check_nccl(device, dry):
    import torch.distributed as dist

    backend = "gloo" if dry else "nccl"
    store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        t = torch.ones(3, device=device)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()
    return "ok", f"{backend}: one rank, all-reduce"


def check_encoders(device, dry):
    import data
    from model import load_encoder
    from tiny import make_tiny_encoder_dir, make_tiny_whisper_dir

    tmp = Path(tempfile.mkdtemp(prefix="gpu_smoke_enc_"))
    waves = [0.1 * torch.randn(16000 * 3)]
    out = []
    for name, folder in (("zipformer", make_tiny_encoder_dir(tmp / "z", seed=1)),
                         ("whisper", make_tiny_whisper_dir(tmp / "w"))):
        enc = load_encoder(folder, device=device).eval()
        feats, lens = (enc.features(waves, None, device) if name == "whisper"
                       else data.fbank(waves, device=device))
        with torch.no_grad():
            ref = enc(feats, lens)[0].float()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                low = enc(feats, lens)[0].float()
        rel = ((low - ref).abs().max() / ref.abs().max()).item()
        out.append(f"{name} {rel:.2e}")
    return "ok", "bf16 vs fp32 max rel diff: " + ", ".join(out)


def check_batching(device, dry):
    import llm
    from model import AZeroS
    from tiny import make_tiny_release

    root = make_tiny_release(Path(tempfile.mkdtemp(prefix="gpu_smoke_rel_")) / "r", paraling=False)
    model = AZeroS.from_pretrained(root, device=device.type)
    waves = [0.1 * torch.randn(int(16000 * s)) for s in (1.0, 1.7, 2.3, 0.8)]
    messages = [[model.user_message("Describe it.")] for _ in waves]
    opts = llm.GenerationOptions(max_new_tokens=8)
    batched = model.generate(waves, messages, opts)
    alone = [model.generate([w], [m], opts)[0] for w, m in zip(waves, messages)]
    same = sum(a == b for a, b in zip(batched, alone))
    return "ok", f"{same}/{len(waves)} rows identical (bf16 may differ in a late token)"


CHECKS = {"cuda": check_cuda, "step_7b": check_step_7b, "pipeline": check_pipeline,
          "nccl": check_nccl, "encoders": check_encoders, "batching": check_batching}


def main(argv=None) -> dict:
    """Run the checks; print a row per check and return {check: (status, numbers)}. A failed
    check does not stop the others; any failure ends in a CheckError naming how many."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), help="run these checks only")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    results = {}
    print(f"| {'check':<9} | {'result':<8} | numbers")
    print(f"|{'-' * 11}|{'-' * 10}|{'-' * 60}")
    for name in args.only or CHECKS:
        start = time.perf_counter()
        try:
            status, numbers = CHECKS[name](device, args.dry_run)
        except Exception as e:  # a smoke test reports every failure and goes on
            status, numbers = "FAILED", f"{type(e).__name__}: {e}"[:300]
        print(f"| {name:<9} | {status:<8} | {numbers} ({time.perf_counter() - start:.1f} s)",
              flush=True)
        results[name] = (status, numbers)
    failed = [name for name, (status, _) in results.items() if status == "FAILED"]
    if failed:
        raise checks.CheckError(f"{len(failed)} of {len(results)} checks failed: "
                                f"{', '.join(failed)}")
    return results


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
