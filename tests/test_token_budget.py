"""train.py --max-tokens: each row's length in the LLM is counted from the manifest (exactly what
the forward pass builds), the sampler keeps rows x longest row within the budget, and a row too
long for it alone is an error naming its file:line. Tiny random models on the CPU."""
import json

import numpy as np
import pytest
import torch

import data
import llm
import train
from model import AZeroS
from support.manifest import read_manifest
from tiny import make_tiny_encoder_dir, make_tiny_llm_dir, make_tiny_whisper_dir, write_wav

RESPONSES = ["cat", "a dog and a cat under the tree", "sun sun sun", "", "the end of a long day"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    rng = np.random.default_rng(0)
    # durations straddle frame edges: 0.005 s steps move the fbank count by 0 or 1 frame
    seconds = [0.6, 0.605, 0.61, 0.935, 1.0, 1.3, 1.645, 2.2, 2.875, 3.1] + \
        rng.uniform(0.5, 3.5, 10).round(3).tolist()
    rows = []
    for i, s in enumerate(seconds):
        wav = write_wav(root / f"u{i}.wav", s, seed=i)
        rows.append({"id": f"u{i}", "audio": str(wav), "duration": s, "text": f"u {i}",
                     "mode": "sift_sp" if i % 2 else "sift_s",
                     "response": RESPONSES[i % len(RESPONSES)], "truncated": i % 3 == 0,
                     **({"instruction": "What is said?"} if i % 4 == 1 else {})})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"llm": str(make_tiny_llm_dir(root / "llm")), "manifest": str(root / "m.jsonl"),
            "speech": str(make_tiny_encoder_dir(root / "speech", seed=1)),
            "paraling": str(make_tiny_encoder_dir(root / "paraling", seed=2)),
            "whisper": str(make_tiny_whisper_dir(root / "whisper"))}


def built_lengths(model, records, max_length):
    """The row lengths the training forward really builds (train.run_batch's path, no backward)."""
    items = [data.AudioDataset(records)[i] for i in range(len(records))]
    batch = data.collate(items)
    enc = train.encoder_outputs(model, batch, torch.device("cpu"), None, None)
    messages = [model.training_messages(r) for r in records]
    built = llm.build_batch(model.llm, model.tokenizer, messages, model.project(enc),
                            training=True, max_length=max_length)
    return built.attention_mask.sum(1).tolist()


@pytest.mark.parametrize("encoders", ["zipformer", "zipformer+paraling", "whisper+paraling"])
def test_counted_tokens_are_the_rows_the_forward_builds(setup, encoders):
    speech = setup["whisper"] if encoders.startswith("whisper") else setup["speech"]
    paraling = setup["paraling"] if "paraling" in encoders else None
    model = AZeroS.from_components(setup["llm"], speech, paraling)
    model.set_stage("both" if paraling else 1)
    records = read_manifest(setup["manifest"])
    full = train.row_tokens(model, records, None)
    assert full.tolist() == built_lengths(model, records, None)
    cut = int(full.max()) - 2  # --max-length cuts the end of the longest answers (not the audio)
    counted = train.row_tokens(model, records, cut)
    assert counted.tolist() == built_lengths(model, records, cut)
    assert (counted < full).any() and (counted == full).any()


def test_sampler_never_exceeds_the_budget_and_resumes_exactly():
    rng = np.random.default_rng(1)
    durations = [rng.uniform(1, 20, 300).round(2).tolist(), rng.uniform(1, 5, 80).tolist()]
    # tokens grow with duration (6.25 audio frames a second) plus a text part of any length
    tokens = [(np.array(d) * 6.25).astype(int) + rng.integers(10, 300, len(d)) for d in durations]
    flat = np.concatenate(tokens)
    kw = dict(max_duration=400.0, max_batch=64, seed=3, world_size=2, tokens=tokens,
              max_tokens=1500)
    ranks = [data.DurationBucketSampler(durations, rank=r, **kw) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    batches = [b for s in ranks for b in list(s)]
    assert sorted(i for b in batches for i in b) == list(range(len(flat)))  # each row once
    padded = [flat[b].max() * len(b) for b in batches]
    assert max(padded) <= 1500
    # the budget, not the other caps, shaped these batches: without it they hold more tokens
    loose = data.DurationBucketSampler(durations, **{**kw, "max_tokens": None, "tokens": None})
    loose.set_epoch(2)
    assert max(flat[b].max() * len(b) for b in loose) > 1500
    # resume after 5 batches: the identical rest
    first = data.DurationBucketSampler(durations, rank=1, **kw)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    resumed = data.DurationBucketSampler(durations, rank=1, **kw)
    resumed.load_state_dict(first.state_dict())
    resumed.set_epoch(2)
    assert head + list(resumed) == [b for b in ranks[1]]


def test_sampler_refuses_a_row_over_the_budget():
    with pytest.raises(ValueError, match="row 2 has 900 tokens, more than max_tokens 800"):
        data.DurationBucketSampler([1.0, 2.0, 3.0], tokens=[100, 200, 900], max_tokens=800)


def stage1(setup, exp, *extra):
    return ["--stage", "1", "--llm", setup["llm"], "--speech-encoder", setup["speech"],
            "--train", setup["manifest"], "--exp", str(exp), "--num-workers", "0",
            "--max-duration", "1000", "--no-spec-augment", "--device", "cpu", *extra]


def test_training_batches_stay_within_the_budget(setup, tmp_path, monkeypatch):
    """A whole epoch of stage 1 under --max-tokens: every LLM input block the forward builds has
    rows x length <= the budget, and the budget (not --max-batch) decided the batch sizes."""
    model = AZeroS.from_components(setup["llm"], setup["speech"])
    model.set_stage(1)
    tokens = train.row_tokens(model, read_manifest(setup["manifest"]), 512)
    budget = int(tokens.max()) * 3  # room for 3 rows of the longest, more of the short ones
    shapes, build = [], llm.build_batch
    monkeypatch.setattr(llm, "build_batch", lambda *a, **k: shapes.append(
        tuple((b := build(*a, **k)).input_ids.shape)) or b)
    train.main(stage1(setup, tmp_path / "e", "--max-tokens", str(budget), "--epochs", "1"))
    assert sum(rows for rows, _ in shapes) == len(tokens)  # every row, once
    assert all(rows * length <= budget for rows, length in shapes)
    assert max(rows for rows, _ in shapes) > 1 and len(shapes) < len(tokens)


def test_a_row_longer_than_the_budget_is_named(setup, tmp_path):
    model = AZeroS.from_components(setup["llm"], setup["speech"])
    model.set_stage(1)
    tokens = train.row_tokens(model, read_manifest(setup["manifest"]), 512)
    longest = int(tokens.argmax())
    with pytest.raises(train.TrainError) as e:
        train.main(stage1(setup, tmp_path / "e", "--max-tokens", str(int(tokens.max()) - 1)))
    msg = str(e.value)
    assert msg.startswith(f"{setup['manifest']}:{longest + 1}: row 'u{longest}' is "
                          f"{int(tokens.max())} tokens")
    assert f"more than --max-tokens {int(tokens.max()) - 1}" in msg


def test_resume_with_another_budget_says_the_epoch_is_replanned(setup, tmp_path, capsys):
    """Lowering --max-tokens after running out of memory and resuming is allowed, but the saved
    position counts batches of the old plan: said in one line (and not when nothing changed)."""
    exp = tmp_path / "e"
    train.main(stage1(setup, exp, "--max-tokens", "4000", "--max-steps", "1"))
    train.main(stage1(setup, exp, "--max-tokens", "4000", "--max-steps", "2", "--resume"))
    assert "batching changed" not in capsys.readouterr().out
    train.main(stage1(setup, exp, "--max-tokens", "3000", "--max-steps", "3", "--resume"))
    assert ("note: batching changed since the checkpoint (--max-tokens 4000 -> 3000): the rest "
            "of its epoch is planned anew" in capsys.readouterr().out)
