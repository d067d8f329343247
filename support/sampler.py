"""Support module (not the method): the duration-bucketed batch sampler behind data.py's
DurationBucketSampler (the role Lhotse's DynamicBucketingSampler plays in the official recipe).

Everything about which utterances form which batch, on which rank, lives here, decided by (seed,
epoch) alone so that DDP ranks agree without talking and a resumed run continues exactly:
  1. checks of the sampler's arguments and of the rows' token counts;
  2. `equalise_for_ranks`, the DDP rule that gives every rank the same number of steps;
  3. `ResumableSampler`, the DataLoader protocol that resumes in the middle of an epoch;
  4. `BucketSampler`, one epoch's plan: mixing, buckets, packing under the caps, shuffling.
"""
from __future__ import annotations

import warnings

import numpy as np


def check_sampler(weights: list[float], num_manifests: int, rank: int, world_size: int) -> None:
    if len(weights) != num_manifests:
        raise ValueError(f"{len(weights)} weights for {num_manifests} manifests")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0, got {weights}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")


def row_token_array(tokens, durations: list[np.ndarray], max_tokens: int) -> np.ndarray:
    """The sampler's per-row token counts, one flat int64 array over all manifests, checked: one
    list per manifest, one count per row, and no row over the budget (a row the budget cannot
    hold would otherwise be packed alone and run out of memory, or be dropped silently)."""
    if tokens is None:
        if max_tokens:
            raise ValueError("max_tokens needs the rows' token counts (tokens=)")
        return np.zeros(sum(len(d) for d in durations), dtype=np.int64)
    if len(tokens) != len(durations) or any(len(t) != len(d) for t, d in zip(tokens, durations)):
        raise ValueError(f"tokens: {[len(t) for t in tokens]} rows per manifest, durations: "
                         f"{[len(d) for d in durations]}")
    flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in tokens]) if tokens else \
        np.zeros(0, dtype=np.int64)
    if max_tokens and len(flat) and flat.max() > max_tokens:
        i = int(flat.argmax())
        raise ValueError(f"row {i} has {flat[i]} tokens, more than max_tokens {max_tokens}")
    return flat


def equalise_for_ranks(batches: list[list[int]], world_size: int,
                       drop_last: bool) -> tuple[list[list[int]], int]:
    """Make the number of batches a multiple of world_size -> (batches, utterances dropped).

    Every DDP rank must run the same number of steps, or the all-reduce of the last step waits
    forever. drop_last=False: the largest batches are split in two until the count divides, so
    every utterance is still used exactly once. drop_last=True: the last (count % world_size)
    batches are dropped, and the number of utterances they held is returned.
    """
    remainder = len(batches) % world_size
    if remainder == 0:
        return batches, 0
    if drop_last:
        dropped = batches[len(batches) - remainder:]
        return batches[: len(batches) - remainder], sum(len(b) for b in dropped)
    for _ in range(world_size - remainder):
        k = max(range(len(batches)), key=lambda j: len(batches[j]))
        if len(batches[k]) < 2:  # fewer utterances than ranks: nothing left to split
            raise ValueError(f"{sum(len(b) for b in batches)} utterances cannot fill "
                             f"{world_size} ranks; use drop_last=True or fewer ranks")
        half = len(batches[k]) // 2
        batches[k:k + 1] = [batches[k][:half], batches[k][half:]]
    return batches, 0


class ResumableSampler:
    """The DataLoader batch-sampler protocol over a subclass's `epoch_batches()` (this rank's
    batches of `self.epoch`, the same list on every call), resumable in the middle of an epoch.

    `state_dict()` is {"epoch", "batches_done"}; after `load_state_dict`, the next pass skips
    exactly `batches_done` batches of that epoch and yields the rest unchanged. With DataLoader
    workers the sampler runs ahead of training (prefetch), so save the number of batches the
    training loop actually consumed, not this object's own counter.
    """

    def __init__(self):
        self.epoch, self.batches_done = 0, 0
        self._num_dropped = 0  # set by epoch_batches(): what drop_last removed this epoch

    def epoch_batches(self) -> list[list[int]]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch`. Calling it again with the current epoch (e.g. right after
        load_state_dict) keeps the resume position."""
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def __iter__(self):
        batches = self.epoch_batches()
        for i in range(self.batches_done, len(batches)):
            self.batches_done = i + 1
            yield list(batches[i])
        self.batches_done = 0  # the epoch is complete; a new pass starts from its beginning

    def __len__(self) -> int:
        """Batches of the current epoch for this rank, including any a resume will skip."""
        return len(self.epoch_batches())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])

    @property
    def num_dropped(self) -> int:
        """Utterances (all ranks together) that drop_last=True removed from the current epoch."""
        self.epoch_batches()
        return self._num_dropped


class BucketSampler(ResumableSampler):
    """Batches of utterances of similar length, for `DataLoader(batch_sampler=...)`.

    Yields lists of GLOBAL indices into the concatenation of the manifests whose `durations` are
    given (manifest 0's utterances first, then manifest 1's, ...).

    One epoch, all of it decided by (seed, epoch), so every rank computes the same plan:
      1. Mixing. Manifest m contributes `weights[m] * len(m)` utterances: weight 1 = each utterance
         once, 2 = each utterance twice, 0.5 = a random half (drawn without replacement, a fresh
         half every epoch). Default: all weights 1, i.e. an epoch is every utterance exactly once.
      2. Buckets. Sort by duration, cut into `num_buckets` groups of equal count (fewer if a bucket
         would hold less than max_batch utterances), shuffle inside each bucket.
      3. Packing. Fill batches greedily inside each bucket. A batch is padded to its longest
         utterance, so the duration cap counts PADDED seconds: longest * count <= max_duration;
         and count <= max_batch. An utterance longer than max_duration alone still forms a batch
         of one (with a warning): it is never dropped silently. With `tokens` (each row's length
         in the LLM) and `max_tokens`, also longest row * count <= max_tokens: the frozen LLM runs
         on the padded (count, longest) block, so its activation memory follows that product,
         not the seconds. A row longer than max_tokens alone is an error (train.py names it).
      4. Shuffle the batch order, then deal the batches round-robin to the ranks. Every DDP rank
         must run the same number of steps: the largest batches are split until the count divides
         by world_size, or with drop_last=True the last few are dropped (`self.num_dropped`).

    set_epoch, iteration and the exact mid-epoch resume (state_dict / load_state_dict) come from
    ResumableSampler.
    """

    def __init__(self, durations, weights=None, max_duration: float = 200.0, max_batch: int = 64,
                 num_buckets: int = 30, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, shuffle: bool = True, tokens=None,
                 max_tokens: int | None = None):
        if durations and not isinstance(durations[0], (list, tuple, np.ndarray)):
            durations = [durations]  # a single manifest given as a flat list
            tokens = [tokens] if tokens is not None else None
        self.durations = [np.asarray(d, dtype=np.float64) for d in durations]
        self.weights = ([1.0] * len(self.durations) if weights is None
                        else [float(w) for w in weights])
        check_sampler(self.weights, len(self.durations), rank, world_size)
        super().__init__()  # epoch 0, nothing done yet
        self.max_duration, self.max_batch = float(max_duration), int(max_batch)
        self.num_buckets, self.seed = int(num_buckets), seed
        self.rank, self.world_size = rank, world_size
        self.drop_last, self.shuffle = drop_last, shuffle
        self.offsets = np.cumsum([0] + [len(d) for d in self.durations])[:-1]
        self.all_durations = np.concatenate(self.durations) if self.durations else np.zeros(0)
        # rows' token counts (all zero without a token budget: the cap then never binds)
        self.max_tokens = int(max_tokens) if max_tokens else 0
        self.all_tokens = row_token_array(tokens, self.durations, self.max_tokens)
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    # -- the plan of one epoch ---------------------------------------------------------------------

    def epoch_batches(self) -> list[list[int]]:
        """All batches of the current epoch for THIS rank, in order (cached per epoch)."""
        if self._plan_cache is not None and self._plan_cache[0] == self.epoch:
            return self._plan_cache[1]
        pool = self._epoch_pool()
        order = np.argsort(self.all_durations[pool], kind="stable")
        pool = pool[order]
        # Small pools get fewer buckets: a bucket should fill at least one batch, or its leftover
        # partial batch costs a step for nothing.
        num_buckets = max(1, min(self.num_buckets, len(pool) // self.max_batch))
        batches = []
        for b, bucket in enumerate(np.array_split(pool, num_buckets)):
            if self.shuffle:
                bucket = bucket[self._rng(2, b).permutation(len(bucket))]
            batches += self._pack(bucket)
        if self.shuffle:
            batches = [batches[j] for j in self._rng(3).permutation(len(batches))]
        batches, self._num_dropped = equalise_for_ranks(
            batches, self.world_size, self.drop_last)
        mine = batches[self.rank::self.world_size]
        self._plan_cache = (self.epoch, mine)
        return mine

    def _rng(self, *salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *salt])

    def _epoch_pool(self) -> np.ndarray:
        """Step 1: the global indices this epoch draws (with repeats for weights > 1)."""
        pool = []
        for m, (durs, w) in enumerate(zip(self.durations, self.weights)):
            ids = self.offsets[m] + np.arange(len(durs))
            whole, frac = int(w), w - int(w)
            pool += [ids] * whole
            extra = int(round(frac * len(ids)))
            if extra:
                if self.shuffle:
                    pick = self._rng(1, m).choice(len(ids), extra, replace=False)
                else:
                    pick = np.arange(extra)
                pool.append(ids[np.sort(pick)])
        return np.concatenate(pool) if pool else np.zeros(0, dtype=np.int64)

    def _pack(self, bucket: np.ndarray) -> list[list[int]]:
        """Step 3: greedy packing under all caps (padded seconds, padded tokens and count)."""
        batches, current, longest, most = [], [], 0.0, 0
        for i in bucket.tolist():
            d, t = self.all_durations[i], int(self.all_tokens[i])
            if d > self.max_duration:
                warnings.warn(f"utterance {i} lasts {d:.2f} s > max_duration {self.max_duration} s:"
                              " it gets a batch of its own", stacklevel=3)
            new_longest, new_most = max(longest, d), max(most, t)
            too_long = new_longest * (len(current) + 1) > self.max_duration
            too_many = self.max_tokens and new_most * (len(current) + 1) > self.max_tokens
            if current and (too_long or too_many or len(current) >= self.max_batch):
                batches.append(current)
                current, new_longest, new_most = [], d, t
            current.append(i)
            longest, most = new_longest, new_most
        if current:
            batches.append(current)
        return batches
