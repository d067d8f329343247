"""How the CPU demo runs on a small shared machine: OpenMP wait policy, thread count and precision,
chosen by measurement at start-up and printed. Support code for demo.py, not part of the method.

Three facts about shared 2-core machines (the measurements are in BENCHMARKS.md, "Threads and
OpenMP wait policy under load"):

  * GNU OpenMP's default wait policy lets an idle thread spin. When another process wants a core,
    the spinning thread takes CPU from it, and a descheduled thread stalls every parallel operator:
    a training step becomes many times slower. OMP_WAIT_POLICY=PASSIVE (sleep at once) removes
    this. It is read when torch loads OpenMP, so it must be set before `import torch`:
    `set_wait_policy()` first thing.
  * Even with PASSIVE, 2 threads lose to 1 when the cores are busy with other work, because every
    parallel operator waits for its slower thread. They win when two cores are free. So the probe
    asks two questions, both in CPU seconds (what the work costs, whatever else runs) rather than
    wall seconds: does a second thread add little CPU time for the same matrix products (spin and
    synchronisation overhead), and do our 2 threads actually get 2 cores (CPU seconds per wall
    second, the median of repeats)? Only two yeses give 2 threads: 1 thread is never far from the
    best, 2 threads on a busy machine can be much worse.
  * Whether bf16 matrix products beat fp32 depends on the CPU, not on its flags (some CPUs with
    the AVX512-BF16 flag multiply bf16 slower than fp32, others much faster). The probe times both
    on one thread in CPU seconds, so a busy machine cannot flip the choice.

Every probe takes the minimum over repeats: interference only ever adds time.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

WAIT_POLICY = "PASSIVE"
REPEATS = 3
# 2 threads are used when their CPU time is at most this much above 1 thread's for the same work:
# at 1.3, two threads still finish in 0.65 of the time when each gets a core.
MAX_THREAD_OVERHEAD = 1.3
# ... and when they ran on at least this many cores' worth of CPU time per wall second (2 = both,
# all along).
MIN_PARALLELISM = 1.5
# bf16 is used when it needs at most this share of fp32's CPU time (a clear win, not noise).
BF16_MAX_RATIO = 0.7
# Matrix sizes of the demo's LLM step: 256 positions x SmolLM2's hidden 576 x its MLP width 1536.
PROBE_SHAPES = ((256, 576), (576, 1536))


def set_wait_policy(policy: str = WAIT_POLICY) -> str:
    """Sleeping idle OpenMP threads, unless the user chose otherwise. Returns the policy in force,
    noting when torch was imported first (OpenMP has then read the environment: too late)."""
    os.environ.setdefault("OMP_WAIT_POLICY", policy)
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")  # bit-identical reruns (train.py says why)
    late = (
        " (set after torch was imported: no effect in this process)"
        if "torch" in sys.modules
        else ""
    )
    return os.environ["OMP_WAIT_POLICY"] + late


def cpu_seconds(fn, repeats: int = REPEATS) -> float:
    """The least process CPU time (all threads) of fn() over `repeats` runs, after a warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def parallelism(fn, repeats: int = REPEATS) -> float:
    """The median over `repeats` runs of fn()'s process CPU seconds per wall second: how many cores
    we got."""
    fn()
    shares = []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        shares.append((time.process_time() - c) / (time.perf_counter() - w))
    return sorted(shares)[len(shares) // 2]


def matmuls(dtype, n: int = 2):
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*s, generator=gen).to(dtype) for s in PROBE_SHAPES)
    return lambda: [a @ b for _ in range(n)]


@dataclass
class Runtime:
    threads: int
    precision: str
    wait_policy: str
    thread_overhead: (
        float  # CPU time with 2 threads / with 1 thread, same work (nan: one core only)
    )
    parallelism: float  # CPU seconds per wall second of the 2-thread probe (nan: one core only)
    bf16_ratio: float  # CPU time of bf16 / fp32 matmuls on one thread

    def line(self) -> str:
        return (
            f"CPU runtime: {self.threads} thread(s) (2 threads: {self.thread_overhead:.2f}x the "
            f"CPU time of 1, on {self.parallelism:.2f} cores), {self.precision} (bf16 matmul CPU "
            f"time {self.bf16_ratio:.2f}x fp32), OMP_WAIT_POLICY={self.wait_policy}"
        )


def choose(threads: int | None = None, precision: str | None = None) -> Runtime:
    """Measure what is not given, set torch's thread count, return the choice (after
    set_wait_policy)."""
    import torch

    policy = os.environ.get("OMP_WAIT_POLICY", "unset (spinning)")
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    torch.set_num_threads(1)
    fp32 = cpu_seconds(matmuls(torch.float32))
    bf16 = cpu_seconds(matmuls(torch.bfloat16), repeats=1)
    if (
        bf16 < 2 * fp32
    ):  # only a close call needs the repeats (emulated bf16 is 30x slower: no doubt there)
        bf16 = min(bf16, cpu_seconds(matmuls(torch.bfloat16)))
    ratio = bf16 / fp32
    overhead = cores_used = float("nan")
    if cores >= 2:
        torch.set_num_threads(2)
        overhead = cpu_seconds(matmuls(torch.float32)) / fp32
        cores_used = parallelism(
            matmuls(torch.float32, n=8)
        )  # ~0.1 s runs: longer than a scheduler slice
    auto_threads, auto_precision = decide(cores, overhead, cores_used, ratio)
    threads, precision = threads or auto_threads, precision or auto_precision
    torch.set_num_threads(threads)
    return Runtime(threads, precision, policy, overhead, cores_used, ratio)


def decide(
    cores: int, thread_overhead: float, cores_used: float, bf16_ratio: float
) -> tuple[int, str]:
    """The rule: 2 threads if there are 2 cores, the second thread costs little CPU time and both
    threads ran at once (NaN compares false: one core); bf16 if it needs clearly less CPU time."""
    two = cores >= 2 and thread_overhead <= MAX_THREAD_OVERHEAD and cores_used >= MIN_PARALLELISM
    return (2 if two else 1), "bf16" if bf16_ratio <= BF16_MAX_RATIO else "fp32"
