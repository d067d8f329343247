"""Speed of one AZeroS training step: projector -> frozen LLM forward + backward -> AdamW.

Each configuration runs twice: `all` heads every position (the LLM's own forward with labels, as
the official code and HF causal LMs compute the loss), `answer` heads only the positions that
predict an answer token (llm.answer_logits, what train.py runs); the ratio column compares them.

The LLM is built from a config with random weights, so nothing is downloaded: the step costs the
same whatever the weights are. Encoders are left out (train.py --cache-encoders skips them after the
first epoch; bench_zipformer.py measures them). Each row runs `--steps` timed steps after `--warmup`
untimed ones and reports:

  tokens/s  LLM positions processed per second (batch x sequence length: prompt + audio frames +
            answer)
  MFU       model FLOPs utilisation on GPU: achieved model FLOP/s / the chip's peak bf16 FLOP/s.
            Model FLOPs per token = 4 N + 8 n_layer d L  (N: LLM parameters without the input
            embedding, d: hidden size, L: sequence length), the output head counted only at the
            answer positions (the loss needs no more: heading the others is waste, not work).
            The usual "6 N" of LLM training counts forward (2 N), gradients of activations (2 N)
            and of weights (2 N); the LLM here is frozen, so its weight gradients are never
            computed and 4 N remains. The attention term is 4 d L per layer forward, doubled for
            the backward pass, not halved for causality.

    python -m bench.bench_train              # CPU: tiny, small and SmolLM2-135M, fp32 and bf16
    python -m bench.bench_train --gpu-configs qwen2.5-7b   # on a GPU also Qwen2.5-7B in bf16
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import llm as llm_lib
from projector import Projector
from support import checks
from support.model_support import per_token_parameters

CONFIGS = {
    # the tests' LLM (tests/test_train.py)
    "tiny": dict(vocab_size=608, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    # a small but LLM-shaped model that still runs on 2 CPU cores
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2),
    # SmolLM2-135M-Instruct, the demo's LLM (a Llama; Qwen2 with these shapes costs the same)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True),
    # Qwen2.5-0.5B-Instruct and Qwen2.5-7B-Instruct (the paper's LLM), from their config.json
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def build_llm(name: str, dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**CONFIGS[name], max_position_embeddings=32768, rope_theta=1e6)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        llm = Qwen2ForCausalLM(config).to(dtype)
    llm.requires_grad_(False).eval()
    return llm


def model_flops(llm, batch: int, seq_len: int, answer_tokens: int) -> float:
    """FLOPs of one step: the body at every position, the output head at the answer positions."""
    c = llm.config
    head = c.vocab_size * c.hidden_size
    attention = 8 * c.num_hidden_layers * c.hidden_size * seq_len
    body = 4 * (per_token_parameters(llm) - head) + attention
    return batch * (body * seq_len + 4 * head * answer_tokens)


def peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def bench(name: str, device, batch: int, audio_s: float, prompt_tokens: int, answer_tokens: int,
          steps: int, warmup: int, precision: str = "bf16", head: str = "answer") -> dict:
    """One row. precision bf16 = autocast (train.py --precision bf16); on CPU the LLM weights stay
    fp32, as in train.py, and autocast casts them per matmul. head: "all" or "answer" positions."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    llm = build_llm(name, dtype, device)
    hidden, vocab = llm.config.hidden_size, llm.config.vocab_size
    projector = Projector(768, hidden, 4).to(device)  # fp32 master weights, as in train.py
    optimizer = torch.optim.AdamW(projector.parameters(), lr=1e-3, fused=device.type == "cuda")

    frames = int(audio_s * 25)  # 25 Hz encoder frames -> frames // 4 audio positions
    enc = torch.randn(batch, frames, 768, device=device)
    enc_lens = torch.full((batch,), frames, device=device)
    prompt = torch.randint(0, vocab, (batch, prompt_tokens), device=device)
    answer = torch.randint(0, vocab, (batch, answer_tokens), device=device)
    embed = llm.get_input_embeddings()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            audio, _ = projector(enc, enc_lens)
            x = torch.cat([embed(prompt), audio.to(dtype), embed(answer)], dim=1)
            labels = torch.full(x.shape[:2], -100, dtype=torch.long, device=device)
            labels[:, -answer_tokens:] = answer
            if head == "all":
                loss = llm(inputs_embeds=x, labels=labels).loss
            else:
                mask = torch.ones(x.shape[:2], dtype=torch.long, device=device)
                batch_in = llm_lib.Batch(None, x, mask, labels)
                logits, targets, answer_mask = llm_lib.answer_logits(llm, batch_in)
                loss = llm_lib.token_losses(logits, targets, answer_mask).sum() / targets.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return x.shape[1]

    for _ in range(warmup):
        seq_len = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        seq_len = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t) / steps
    tokens = batch * seq_len
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"cpu x{torch.get_num_threads()}"
    row = {"device": where,
           "config": name, "params": sum(p.numel() for p in llm.parameters()), "batch": batch,
           "seq": seq_len, "dtype": precision, "head": head, "step_ms": dt * 1e3,
           "tokens_s": tokens / dt,
           "mfu": None, "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}
    # achieved model TFLOP/s
    row["tflops"] = model_flops(llm, batch, seq_len, answer_tokens) / dt / 1e12
    peak = peak_tflops(device)
    if peak:
        row["mfu"] = row["tflops"] / peak
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-configs", nargs="*", default=["tiny", "small", "smollm2-135m"],
                   choices=list(CONFIGS))
    p.add_argument("--cpu-precisions", nargs="*", default=["fp32", "bf16"],
                   choices=["fp32", "bf16"],
                   help="CPU rows (bf16 pays off on CPUs with AVX512-BF16/AMX)")
    p.add_argument("--gpu-configs", nargs="*", default=["qwen2.5-0.5b", "qwen2.5-7b"],
                   choices=list(CONFIGS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gpu-batch", type=int, default=32)
    p.add_argument("--audio-seconds", type=float, default=10.0,
                   help="per utterance: 10 s = 62 audio positions")
    p.add_argument("--prompt-tokens", type=int, default=20, help="chat template around the audio")
    p.add_argument("--answer-tokens", type=int, default=80, help="supervised response tokens")
    p.add_argument("--heads", nargs="*", default=["all", "answer"], choices=["all", "answer"],
                   help="where the output head runs: every position (HF) or the answer (ours)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)

    rows = []
    for name in args.cpu_configs:
        for precision in args.cpu_precisions:
            for head in args.heads:
                rows.append(bench(name, torch.device("cpu"), args.batch, args.audio_seconds,
                                  args.prompt_tokens, args.answer_tokens, args.steps, args.warmup,
                                  precision, head))
                print(rows[-1], flush=True)
    if torch.cuda.is_available():
        for name in args.gpu_configs:
            for head in args.heads:
                rows.append(bench(name, torch.device("cuda"), args.gpu_batch, args.audio_seconds,
                                  args.prompt_tokens, args.answer_tokens, args.steps,
                                  args.warmup, head=head))
                print(rows[-1], flush=True)
                torch.cuda.empty_cache()
    else:
        print("no CUDA device: GPU rows skipped")

    # speed relative to the first row of the same device and config (on CPU fp32 with the head at
    # every position), measured in this process
    first = {}
    for r in rows:
        first.setdefault((r["device"], r["config"]), r["step_ms"])
    print("\n| device | LLM config | LLM params | batch x seq | precision | head | step (ms) "
          "| speed vs first row | tokens/s | model TFLOP/s | MFU | peak mem (GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['mem_gb']:.1f}" if r["mem_gb"] is not None else "-"
        speed = first[r["device"], r["config"]] / r["step_ms"]
        print(f"| {r['device']} | {r['config']} | {r['params'] / 1e6:.1f}M "
              f"| {r['batch']} x {r['seq']} | {r['dtype']} | {r['head']} | {r['step_ms']:.1f} "
              f"| {speed:.2f}x "
              f"| {r['tokens_s']:,.0f} | {r['tflops']:.3g} | {mfu} | {mem} |")


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
