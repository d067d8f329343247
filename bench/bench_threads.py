"""Benchmark: CPU training steps with 1 or 2 threads, OpenMP wait policy ACTIVE or PASSIVE, alone or
beside a second process that burns CPU (what a shared 2-core machine looks like).

PyTorch parallelises each operator with OpenMP. After an operator, an OpenMP thread that has no work
either spins for a while (ACTIVE, GNU OpenMP's default: fastest when every thread owns a core) or
sleeps at once (PASSIVE). When another process wants a core, a spinning thread takes CPU from it,
and a thread that was descheduled stalls the next operator for everyone else, so a 2-thread step can
become many times slower.

Each configuration runs in a fresh process (OMP_WAIT_POLICY is read when torch loads OpenMP) and
times `--steps` steps after one warm-up step; the burner is a Python busy loop (one core), bounded
in time.

    python -m bench.bench_threads          # both workloads, 8 configurations each, 5-30 min
    python -m bench.bench_threads --workloads encoder --steps 10 --burners 2

Workloads: `encoder` = one optimizer step of the demo's small Zipformer (pretrain_encoders.py, batch
12 x 4 s); `llm` = one projector step through a SmolLM2-135M-shaped LLM (random weights, batch 4,
fp32). Columns: median and worst step, CPU seconds per step (all threads), and the median step
relative to 1 thread PASSIVE under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from support import checks

ROOT = Path(__file__).resolve().parent.parent
BURN = (
    "import time, sys\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"
)


def build(workload: str):
    """-> a function running one training step of the workload."""
    import torch

    torch.manual_seed(0)
    if workload == "encoder":
        from recipe import pretrain_encoders as pe
        from zipformer import ZipformerEncoder

        encoder = ZipformerEncoder(pe.small_config())
        head = pe.AttributeHeads(encoder.output_dim)
        params = list(encoder.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3)
        x, lens = torch.randn(12, 400, 80), torch.full((12,), 400)
        labels = {a: torch.zeros(12, dtype=torch.long) for a in pe.ATTRIBUTES}

        def step():
            logits = head(*encoder(x, lens))
            loss = sum(torch.nn.functional.cross_entropy(logits[a], labels[a]) for a in labels)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return step

    from bench.bench_train import build_llm
    from projector import Projector

    llm = build_llm("smollm2-135m", torch.float32, torch.device("cpu"))
    projector = Projector(384, llm.config.hidden_size, 4)
    opt = torch.optim.AdamW(projector.parameters(), lr=1e-3)
    enc, enc_lens = torch.randn(4, 100, 384), torch.full((4,), 100)
    prompt, answer = torch.randint(0, 49152, (4, 20)), torch.randint(0, 49152, (4, 32))
    embed = llm.get_input_embeddings()

    def step():
        audio, _ = projector(enc, enc_lens)
        x = torch.cat([embed(prompt), audio, embed(answer)], dim=1)
        labels = torch.full(x.shape[:2], -100)
        labels[:, -32:] = answer
        loss = llm(inputs_embeds=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def child(workload: str, threads: int, steps: int) -> None:
    """Runs in the fresh process: time the steps, print one JSON line."""
    import torch

    torch.set_num_threads(threads)
    step = build(workload)
    step()  # warm-up: allocations, OpenMP thread start
    walls, cpus = [], []
    for _ in range(steps):
        w, c = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    print(json.dumps({"wall": walls, "cpu": cpus}))


def run(workload: str, threads: int, policy: str, burners: int, steps: int, timeout: float) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY=policy)
    burn = [subprocess.Popen([sys.executable, "-c", BURN, str(timeout)]) for _ in range(burners)]
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.bench_threads",
                "--child",
                workload,
                "--threads",
                str(threads),
                "--steps",
                str(steps),
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:  # a configuration this slow is an answer too
        return {"median": float("inf"), "worst": float("inf"), "cpu": float("nan")}
    finally:
        for p in burn:  # only the burners this function started
            p.kill()
            p.wait()
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    times = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "median": statistics.median(times["wall"]),
        "worst": max(times["wall"]),
        "cpu": statistics.median(times["cpu"]),
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workloads", nargs="*", default=["encoder", "llm"], choices=["encoder", "llm"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument(
        "--burners", type=int, default=1, help="busy-loop processes beside the loaded runs"
    )
    p.add_argument(
        "--timeout", type=float, default=300, help="seconds per configuration (burners stop too)"
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.threads, args.steps)

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the runs")
    print(
        "| workload | load | OMP_WAIT_POLICY | threads | median step (s) | worst step (s) "
        "| CPU s / step | median vs 1 thread PASSIVE |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for workload in args.workloads:
        for burners in (0, args.burners):
            rows = {
                (policy, threads): run(workload, threads, policy, burners, args.steps, args.timeout)
                for policy in ("PASSIVE", "ACTIVE")
                for threads in (1, 2)
            }
            base = rows["PASSIVE", 1]["median"]
            load = f"{burners} busy process(es)" if burners else "none of ours"
            for (policy, threads), r in rows.items():
                print(
                    f"| {workload} | {load} | {policy} | {threads} | {r['median']:.3f} "
                    f"| {r['worst']:.3f} | {r['cpu']:.3f} | {r['median'] / base:.2f} |",
                    flush=True,
                )


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
