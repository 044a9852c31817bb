"""Epoch plans: which samples each rank and each loader worker reads, computed from the manifest.

Pure arithmetic on shard lengths, no I/O. This is what makes epochs exact (see docs/data.md):

* The split's shards are laid end to end (in a seeded per-epoch order for training) into one
  global sequence of ``N`` positions. Shards are never assigned whole to ranks: ranks take
  *contiguous position ranges*, so any shard layout (1 shard or 1,000, any sizes) splits evenly.
* Train: every rank reads exactly ``steps * batch`` positions, ``steps = N // (world * batch)``;
  the last ``N - world * steps * batch`` positions of the epoch's order are dropped (< one global
  batch, and different samples each epoch because the shard order is reshuffled).
* Eval: rank ``r`` reads positions ``[r*N//W, (r+1)*N//W)``: every sample exactly once.
* Inside a rank the range is cut into contiguous per-worker ("role") ranges. A train role owns
  whole batches, and the DataLoader's round robin makes rank batch ``i`` come from role
  ``i % K`` — which is how a resumed loader knows where each role stands.

:class:`RankLayout` holds what these counts depend on for one rank and split; its methods are
the arithmetic (``train_steps``, ``eval_batches``, ``role_range``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Members ``[start, start + count)`` of shard ``shard`` (an index into the split's shards)."""

    shard: int
    start: int
    count: int


def shard_order(num_shards: int, seed: int, epoch: int, *, shuffle: bool) -> list[int]:
    """The epoch's shard order: identical on every rank (it depends on seed and epoch only)."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return order


def pieces(lengths: list[int], order: list[int], begin: int, end: int) -> list[Piece]:
    """Map global positions ``[begin, end)`` of the shards laid out in ``order`` to shard pieces."""
    out: list[Piece] = []
    offset = 0  # global position of the first member of the current shard
    for shard in order:
        n = lengths[shard]
        lo, hi = max(begin, offset), min(end, offset + n)
        if lo < hi:
            out.append(Piece(shard, lo - offset, hi - lo))
        offset += n
        if offset >= end:
            break
    return out


def split_even(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[begin, end)`` of part ``index`` when ``n`` items are cut into ``parts`` near-equal runs."""
    return n * index // parts, n * (index + 1) // parts


def role_batches(steps: int, roles: int) -> list[int]:
    """Train batches per role: role ``w`` serves rank batches ``w, w+K, w+2K, ...``."""
    return [steps // roles + (1 if w < steps % roles else 0) for w in range(roles)]


def consumed_by_role(consumed: int, role: int, roles: int) -> int:
    """How many of role ``role``'s batches are among the rank's first ``consumed`` batches."""
    return max(0, (consumed - role + roles - 1) // roles)


@dataclass(frozen=True)
class RoleRange:
    """What one worker role reads: global positions ``[begin, end)`` and where to start."""

    begin: int
    end: int
    skip: int  # positions of this range already consumed before a resume (never decoded)


@dataclass(frozen=True)
class RankLayout:
    """One rank's data layout for one split: the inputs of every count the plan makes.

    All of it is known from the manifest and the run's settings before a sample is read. The
    loader's length, its resume state and every worker's range derive from this one value, so
    they cannot disagree about N, the world size or the batch size.
    """

    num_samples: int  # N: positions in the split (sum of its shard lengths)
    world_size: int
    rank: int
    roles: int  # K: worker roles per rank (max(1, num_workers))
    batch_size: int
    train: bool  # train: equal whole batches per rank; eval: every sample exactly once

    def train_steps(self) -> int:
        """Batches every rank yields per train epoch (the same on all ranks)."""
        steps = self.num_samples // (self.world_size * self.batch_size)
        if steps == 0:
            raise ValueError(f"train split has {self.num_samples} samples, fewer than one "
                             f"global batch ({self.world_size} ranks x {self.batch_size}); "
                             "lower train.batch_size")
        return steps

    def eval_batches(self) -> int:
        """Eval batches this rank yields (ranks may differ by one sample per role; no
        collectives)."""
        total = 0
        for role in range(self.roles):
            r = self._eval_role_range(role)
            total += -(-(r.end - r.begin) // self.batch_size)
        return total

    def batches(self) -> int:
        """Batches this rank yields in a full epoch: :meth:`train_steps` or :meth:`eval_batches`."""
        return self.train_steps() if self.train else self.eval_batches()

    def role_range(self, role: int, consumed_batches: int = 0) -> RoleRange:
        """Global positions worker role ``role`` reads this epoch, and how many of them it skips
        because the rank already consumed ``consumed_batches`` batches (train only: eval
        restarts from its first batch)."""
        if self.train:
            return self._train_role_range(role, consumed_batches)
        return self._eval_role_range(role)

    def _train_role_range(self, role: int, consumed_batches: int) -> RoleRange:
        steps, batch = self.train_steps(), self.batch_size
        per_role = role_batches(steps, self.roles)
        rank_begin = self.rank * steps * batch
        first_batch = sum(per_role[:role])  # roles own contiguous batch blocks of the rank's range
        begin = rank_begin + first_batch * batch
        end = begin + per_role[role] * batch
        skip = consumed_by_role(consumed_batches, role, self.roles) * batch
        return RoleRange(begin, end, skip)

    def _eval_role_range(self, role: int) -> RoleRange:
        # the rank's even share of the split, cut evenly between its roles
        rank_begin, rank_end = split_even(self.num_samples, self.world_size, self.rank)
        lo, hi = split_even(rank_end - rank_begin, self.roles, role)
        return RoleRange(rank_begin + lo, rank_begin + hi, 0)


def class_sampling_weights(class_counts: list[int], power: float) -> list[float]:
    """Per-class sampling weights ``count^-power`` (``data.class_balance``), mean 1 over samples.

    ``power`` 1 makes every class equally likely, 0.5 is square-root balancing. Classes without
    train samples get weight 0. Used by :func:`ddp_train.data.stream.resample_block`.
    """
    raw = [c ** -power if c > 0 else 0.0 for c in class_counts]
    mean = sum(w * c for w, c in zip(raw, class_counts)) / max(1, sum(class_counts))
    return [w / mean for w in raw] if mean else raw
