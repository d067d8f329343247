"""Shared test helpers: fixture paths (pyproject.toml puts the repo root on sys.path), and the
CPU pinned for every test not marked `gpu`.

Most tests check exact numbers that hold in fp32 on the CPU. On a GPU machine the entry points
would pick CUDA and bf16 (their defaults), so every test but the `gpu` ones sees no CUDA: in this
process torch.cuda.is_available() is False, and child processes (torchrun, the CLIs) inherit an
empty CUDA_VISIBLE_DEVICES. `gpu` tests run only where CUDA works, and are skipped elsewhere."""
import os
from pathlib import Path

# as the entry points do (train.py): MKL must not pick its thread count by load, or two identical
# in-process runs can differ in the last bits
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

HAS_CUDA = torch.cuda.is_available()  # read once, before any test hides it


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def pin_cpu(request, monkeypatch):
    if "gpu" in request.keywords:
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
