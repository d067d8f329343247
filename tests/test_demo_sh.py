"""bash demo.sh: creates .venv and installs the pinned requirements once (again when they change),
then runs demo.py with the given options. Checked with a stand-in python3 that records what it is
asked to do."""

import os
import shutil
import subprocess

from conftest import ROOT

FAKE_PYTHON3 = """#!/usr/bin/env bash
# python3 -m venv DIR: make DIR/bin/python, a stand-in that logs its arguments and "runs" demo.py
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    printf '#!/usr/bin/env bash\\necho "$*" >> "%s"\\n' "$LOG" > "$3/bin/python"
    chmod +x "$3/bin/python"
    echo "venv $3" >> "$LOG"
fi
"""


def run(folder, log, *args):
    env = dict(os.environ, PATH=f"{folder / 'fakebin'}:{os.environ['PATH']}", LOG=str(log))
    out = subprocess.run(
        ["bash", str(folder / "demo.sh"), *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = log.read_text().splitlines()
    log.write_text("")
    return lines


def test_demo_sh_installs_once_and_passes_options(tmp_path):
    for name in ("demo.sh", "requirements.txt", "requirements-nodeps.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "fakebin").mkdir()
    (tmp_path / "fakebin" / "python3").write_text(FAKE_PYTHON3)
    (tmp_path / "fakebin" / "python3").chmod(0o755)
    log = tmp_path / "log"
    log.write_text("")

    first = run(tmp_path, log, "--quick", "--out", "exp/x")
    assert first == [
        "venv .venv",
        "-m pip install --quiet --upgrade pip",
        "-m pip install --quiet -r requirements.txt",
        "-m pip install --quiet --no-deps -r requirements-nodeps.txt",
        "demo.py --quick --out exp/x",
    ]
    assert run(tmp_path, log) == ["demo.py"]  # set up already: straight to the demo
    with open(tmp_path / "requirements.txt", "a") as f:
        f.write("something-new==1.0\n")
    assert run(tmp_path, log)[2:] == first[2:4] + [
        "demo.py"
    ]  # changed requirements: installed again
