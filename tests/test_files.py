"""files.py: the one atomic writer and the one resumable JSONL reader every script uses."""
import json
import os

import pytest

from support import files


def test_read_jsonl_repairs_only_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "answers.jsonl"
    files.append_jsonl(path, [{"id": "a"}, {"id": "b"}])
    torn = '{"id": "c", "resp'  # what a kill during an append leaves
    with open(path, "a") as f:
        f.write(torn)
    assert files.read_jsonl(path, repair=True) == [(1, {"id": "a"}), (2, {"id": "b"})]
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'  # cut off the file, not just skipped
    assert f"dropping a partial last line ({len(torn)} bytes)" in capsys.readouterr().err


def test_read_jsonl_input_without_final_newline_is_kept(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a"}\n\n{"id": "b"}')  # people write files like this
    assert files.read_jsonl(path) == [(1, {"id": "a"}), (3, {"id": "b"})]


@pytest.mark.parametrize("line,why", [("[1, 2]", "a line must be a JSON object"),
                                      ('{"id": ', "not valid JSON")])
def test_read_jsonl_names_file_and_line_of_a_bad_line(tmp_path, line, why):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: {why}"):
        files.read_jsonl(path, repair=True)


def test_write_atomic_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "manifest.jsonl"
    files.write_atomic(path, [json.dumps({"id": "old"}) + "\n"])

    def lines():
        yield "half\n"
        raise OSError(28, "No space left on device")
    with pytest.raises(files.WriteError, match="writing the manifest: .*No space left"):
        files.write_atomic(path, lines(), what="writing the manifest")
    assert path.read_text() == '{"id": "old"}\n'
    assert os.listdir(tmp_path) == ["manifest.jsonl"]  # no temporary file left behind
