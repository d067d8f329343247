"""DurationBucketSampler (caps, buckets, mixing, DDP, resume), then dataset -> collate -> fbank."""
import warnings
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch

import data


def random_durations(n, seed, low=1.0, high=20.0):
    return np.random.default_rng(seed).uniform(low, high, n).round(2).tolist()


def padded_seconds(batch, durations):
    return max(durations[i] for i in batch) * len(batch)


@pytest.mark.parametrize("drop_last", [False, True])
def test_two_ranks_see_every_utterance_once_within_both_caps(drop_last):
    manifests = [random_durations(301, 0), random_durations(120, 1, high=5.0)]
    flat = manifests[0] + manifests[1]
    kw = dict(max_duration=60.0, max_batch=8, seed=3, world_size=2, drop_last=drop_last)
    ranks = [data.DurationBucketSampler(manifests, rank=r, **kw) for r in range(2)]
    for s in ranks:
        s.set_epoch(4)
    batches = [list(s) for s in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0]) > 0  # DDP needs equal step counts
    seen = Counter(i for rank in batches for b in rank for i in b)
    assert all(c == 1 for c in seen.values())  # disjoint across ranks, nothing twice
    assert ranks[0].num_dropped == ranks[1].num_dropped
    assert len(seen) + ranks[0].num_dropped == len(flat)
    if not drop_last:
        assert ranks[0].num_dropped == 0
    for b in (b for rank in batches for b in rank):
        assert len(b) <= 8 and padded_seconds(b, flat) <= 60.0


def test_drop_last_reports_what_it_dropped():
    durs = [1.0] * 10  # one bucket, max_batch 3 -> batches of 3, 3, 3, 1; 4 batches on 3 ranks
    ranks = [data.DurationBucketSampler([durs], max_batch=3, num_buckets=1, world_size=3, rank=r,
                                        drop_last=True) for r in range(3)]
    kept = [i for s in ranks for b in s for i in b]
    assert [len(s) for s in ranks] == [1, 1, 1]
    assert len(set(kept)) == len(kept) and ranks[0].num_dropped == 10 - len(kept) > 0


def test_split_instead_of_drop_keeps_every_utterance():
    durs = [1.0] * 10  # same 4 batches; without drop_last the largest batches are split to make 6
    seen = []
    for r in range(3):
        s = data.DurationBucketSampler([durs], max_batch=3, num_buckets=1, world_size=3, rank=r)
        seen += [i for b in s for i in b]
        assert len(s) == 2 and s.num_dropped == 0
    assert sorted(seen) == list(range(10))


def test_resume_after_k_batches_gives_the_identical_rest():
    durs = [random_durations(500, 7)]
    kw = dict(max_duration=80.0, max_batch=16, seed=11, world_size=2, rank=1)
    full = data.DurationBucketSampler(durs, **kw)
    full.set_epoch(2)
    reference = list(full)
    k = 5
    first = data.DurationBucketSampler(durs, **kw)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(k)]
    assert first.state_dict() == {"epoch": 2, "batches_done": k}
    resumed = data.DurationBucketSampler(durs, **kw)
    resumed.load_state_dict({"epoch": 2, "batches_done": k})
    resumed.set_epoch(2)  # a training loop calls this at the top of the epoch; it must not rewind
    assert head + list(resumed) == reference
    # The next epoch starts from its beginning, and through a DataLoader too.
    resumed.set_epoch(3)
    full.set_epoch(3)
    loader = torch.utils.data.DataLoader(list(range(500)), batch_sampler=resumed, collate_fn=list)
    assert [list(b) for b in loader] == list(full)


def test_shuffling_depends_on_seed_and_epoch_only():
    durs = [random_durations(200, 5)]
    a, b, c = (data.DurationBucketSampler(durs, max_duration=50.0, seed=s) for s in (1, 1, 2))
    assert list(a) == list(b) and list(a) != list(c)
    a.set_epoch(1)
    b.set_epoch(0)
    assert list(a) != list(b)
    fixed = data.DurationBucketSampler(durs, max_duration=50.0, shuffle=False)
    assert list(fixed) == list(fixed)


def test_buckets_reduce_padding():
    durs = [random_durations(2000, 9, low=0.5, high=30.0)]
    bucketed = data.DurationBucketSampler(durs, max_duration=120.0, max_batch=32, num_buckets=30)
    unbucketed = data.DurationBucketSampler(durs, max_duration=120.0, max_batch=32, num_buckets=1)
    # padding_efficiency over the epoch equals the frame-weighted mean of the per-batch helper
    real = padded = 0
    for batch in bucketed:
        frames = [data.num_frames(round(durs[0][i] * 16000)) for i in batch]
        real, padded = real + sum(frames), padded + max(frames) * len(frames)
        per_batch = sum(frames) / (max(frames) * len(frames))
        assert data.padding_efficiency([durs[0][i] for i in batch]) == pytest.approx(per_batch)
    assert bucketed.padding_efficiency == pytest.approx(real / padded)
    assert bucketed.padding_efficiency > unbucketed.padding_efficiency
    assert data.padding_efficiency([2.0, 2.0]) == 1.0
    assert data.padding_efficiency([1.0, 3.0]) == pytest.approx((100 + 300) / (2 * 300))


def test_overlong_utterance_gets_a_batch_of_its_own_with_a_warning():
    durs = [[3.0, 45.0, 4.0, 5.0]]
    s = data.DurationBucketSampler(durs, max_duration=30.0, num_buckets=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(s)
    assert [1] in batches and sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    assert any("45.00 s > max_duration" in str(w.message) for w in caught)


def test_weighted_mixing_repeats_and_subsamples():
    a, b = [2.0] * 40, [3.0] * 30
    s = data.DurationBucketSampler([a, b], weights=[2, 0.5], max_duration=20.0, seed=0)
    counts = Counter(i for batch in s for i in batch)
    assert all(counts[i] == 2 for i in range(40))  # weight 2: every utterance of manifest 0 twice
    from_b = [i for i in counts if i >= 40]
    assert len(from_b) == 15 and all(counts[i] == 1 for i in from_b)  # weight 0.5: a distinct half
    s.set_epoch(1)
    assert {i for batch in s for i in batch if i >= 40} != set(from_b)  # a fresh half each epoch


def test_dataset_collate_and_fbank_chain(tmp_path):
    records = []
    for i, (sr, seconds) in enumerate([(16000, 1.0), (8000, 0.5), (16000, 2.0)]):
        noise = 0.1 * np.random.default_rng(i).standard_normal(int(sr * seconds))
        sf.write(tmp_path / f"{i}.wav", noise, sr)
        records.append(data.Record(id=f"u{i}", audio=str(tmp_path / f"{i}.wav"), duration=seconds,
                                   text=f"t{i}"))
    records.append(data.Record(id="seg", audio=str(tmp_path / "2.wav"), duration=0.5, offset=1.0))
    sampler = data.DurationBucketSampler([[r.duration for r in records]], max_duration=10.0,
                                         shuffle=False)
    loader = torch.utils.data.DataLoader(data.AudioDataset(records), batch_sampler=sampler,
                                         collate_fn=data.collate)
    batches = list(loader)
    assert sum(len(b["records"]) for b in batches) == 4
    batch = batches[0]
    assert batch["wave_lens"].tolist() == [len(w) for w in batch["waves"]]
    assert batch["wave_lens"].tolist() == [round(r.duration * 16000) for r in batch["records"]]
    feats, lens = data.fbank(batch["waves"])
    assert lens.tolist() == [data.num_frames(n) for n in batch["wave_lens"].tolist()]
    assert feats.shape == (len(batch["waves"]), max(lens), 80)
