"""The demo's start-up choices: OpenMP wait policy before torch, threads and precision by CPU-time
probes."""

import math
import os
import subprocess
import sys

import torch

from conftest import ROOT
from recipe import cpu_runtime


def policy_in_fresh_process(env_policy):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy:
        env["OMP_WAIT_POLICY"] = env_policy
    code = (
        "from recipe import cpu_runtime; import os; print(cpu_runtime.set_wait_policy()); "
        "import torch; "
        "print(os.environ['OMP_WAIT_POLICY'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_wait_policy_is_passive_unless_the_user_chose():
    assert policy_in_fresh_process(None) == ["PASSIVE", "PASSIVE"]
    assert policy_in_fresh_process("ACTIVE") == ["ACTIVE", "ACTIVE"]
    # here torch is already loaded: the function says that the setting comes too late
    assert "no effect in this process" in cpu_runtime.set_wait_policy()


def test_decision_rule():
    decide = cpu_runtime.decide
    assert decide(2, 1.05, 1.9, 35.0) == (
        2,
        "fp32",
    )  # cheap second thread, two free cores; emulated bf16
    assert decide(2, 1.05, 1.1, 35.0) == (1, "fp32")  # cheap, but the cores are busy: 1 thread
    assert decide(2, 2.7, 1.9, 0.45) == (1, "bf16")  # spinning threads; native bf16
    assert decide(1, math.nan, math.nan, 0.7) == (1, "bf16")  # one core
    assert decide(4, cpu_runtime.MAX_THREAD_OVERHEAD, cpu_runtime.MIN_PARALLELISM, 0.71) == (
        2,
        "fp32",
    )


def test_parallelism_of_a_sleeping_function_is_near_zero():
    import time

    assert cpu_runtime.parallelism(lambda: time.sleep(0.02), repeats=3) < 0.5


def test_cpu_seconds_is_the_minimum_and_choose_sets_threads():
    calls = []

    def work():
        calls.append(1)
        sum(i * i for i in range(20000))

    t = cpu_runtime.cpu_seconds(work, repeats=3)
    assert len(calls) == 4 and 0 < t < 5  # warm-up + 3 timed runs
    before = torch.get_num_threads()
    try:
        rt = cpu_runtime.choose(threads=1, precision="fp32")
        assert (rt.threads, rt.precision, torch.get_num_threads()) == (1, "fp32", 1)
        assert rt.bf16_ratio > 0 and rt.line().startswith("CPU runtime: 1 thread(s)")
    finally:
        torch.set_num_threads(before)
