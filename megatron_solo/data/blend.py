"""Blend several shard sets into one endless, deterministic, resumable sequence of ``Pack``s (docs/blending.md).

The order is a pure function of (seed, weights, set sizes, global index), so the trainer resumes exactly from
``consumed_samples``. Layout of global sample ``g``:

- blend epoch ``e = g // N`` (``N = len(blend)``, by default the total pack count of the sets), position
  ``t = g % N``;
- which set: ``set_index[t]`` from a low-discrepancy schedule (:func:`blending_indices`) built once over ``N``
  samples from the per-epoch counts ``c_i`` (``weights * N`` rounded, summing to ``N``): every epoch holds exactly
  ``c_i`` samples of set ``i`` and at every prefix a set's count is strictly within one sample of its share, with
  no drift across epochs;
- which pack: the ``k``-th sample ever drawn from set ``i`` (``k = e * c_i + sample_in_epoch[t]``) is
  ``perm(seed, i, k // n_i)[k % n_i]``: every pack of a set appears exactly once per pass over that set (its own
  epoch), each pass in a fresh seeded order.
"""

from __future__ import annotations

import heapq
import json
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megatron_solo.data.shards import Pack, ShardSet, _manifest_prefixes, read_manifest, read_shard_meta
from megatron_solo.format.schema import TokenIds

__all__ = [
    "BlendedPacks",
    "blend_summary",
    "blending_indices",
    "build_blend",
    "parse_data_path",
    "solve_vision_weights",
]

_PERM_CACHE = 2  # permutations kept per set (the current pass and the next one around a pass boundary)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _set_pack_count(path: str) -> int:
    """Packs in the shard set at ``path`` from the JSON files only (manifest + shard sidecars), no data opened."""
    directory = Path(path)
    manifest = read_manifest(directory)
    return sum(int(read_shard_meta(p)["packs"]) for p in _manifest_prefixes(directory, manifest))


def parse_data_path(tokens: Sequence[str]) -> list[tuple[float, str]]:
    """Megatron-LM ``--data-path``: ``p1 [p2 ...]`` or ``w1 p1 w2 p2 ...``; returns ``[(weight, path)]``, weights
    normalised to sum 1.

    Without weights every set is weighted by its pack count (Megatron's rule when no weights are given: the blend
    is the concatenation, each pack once per epoch). Each path is a shard-set directory holding ``manifest.json``.
    """
    tokens = [str(t) for t in tokens]
    if not tokens:
        raise ValueError("--data-path is empty: give shard-set directories, optionally as 'w1 p1 w2 p2 ...'")
    numeric = [_is_number(t) for t in tokens]
    if not any(numeric):
        pairs = [(None, t) for t in tokens]
    elif len(tokens) % 2 == 0 and all(numeric[0::2]) and not any(numeric[1::2]):
        pairs = [(float(w), p) for w, p in zip(tokens[0::2], tokens[1::2])]
    else:
        raise ValueError(
            f"--data-path {' '.join(tokens)!r}: mixes weights and paths; use either 'p1 p2 ...' or "
            "'w1 p1 w2 p2 ...' (a weight before every path)"
        )
    for w, p in pairs:
        if w is not None and not (math.isfinite(w) and w > 0):
            raise ValueError(f"--data-path: weight {w} of {p} must be a positive finite number")
        if not (Path(p) / "manifest.json").is_file():
            raise FileNotFoundError(f"--data-path: {p} is not a shard-set directory (no {Path(p) / 'manifest.json'})")
    if pairs[0][0] is None:
        sizes = [_set_pack_count(p) for _, p in pairs]
        for (_, p), n in zip(pairs, sizes):
            if n == 0:
                raise ValueError(f"--data-path: shard set {p} holds no packs")
        pairs = [(float(n), p) for (_, p), n in zip(pairs, sizes)]
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def blending_indices(counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Interleave ``N = sum(counts)`` samples so set ``i`` gets exactly ``counts[i]`` and, at every prefix ``g``,
    its count is strictly within one sample of ``g * counts[i] / N``: ``(set_index int16[N], sample_in_epoch
    int64[N])``.

    Earliest-deadline-first over unit jobs: sample ``j`` of set ``i`` is released at slot ``floor(j N / c_i)`` and due
    by ``ceil((j + 1) N / c_i)``. The windows are feasible (every interval holds at most its length in jobs), EDF is
    optimal for unit jobs, so each sample lands in its window, which is exactly the +-1 lag bound.
    Megatron's ``helpers.build_blending_indices`` greedy is not used: it compares the deficit *before* each step,
    so ties hand samples to zero-weight sets and counts miss integer targets, and its lag exceeds 1.6 samples with
    many sets (measured); this costs ~0.6 s per million samples, once per run.
    """
    counts = [int(c) for c in counts]
    size = sum(counts)
    if size <= 0 or min(counts) < 0:
        raise ValueError(f"blend has no samples per epoch or a negative count: {counts}")
    if len(counts) > np.iinfo(np.int16).max:
        raise ValueError(f"at most {np.iinfo(np.int16).max} shard sets can be blended, got {len(counts)}")
    set_index = np.empty(size, dtype=np.int16)
    sample_index = np.empty(size, dtype=np.int64)
    nxt = [0] * len(counts)
    waiting = [(0, i) for i, c in enumerate(counts) if c > 0]  # (release slot of the set's next sample, set)
    heapq.heapify(waiting)
    ready: list[tuple[int, int]] = []  # (deadline of the set's next sample, set)
    push, pop = heapq.heappush, heapq.heappop
    for g in range(size):
        while waiting and waiting[0][0] <= g:
            _, i = pop(waiting)
            push(ready, (-(-(nxt[i] + 1) * size // counts[i]), i))
        deadline, i = pop(ready)
        if deadline <= g:  # impossible by the feasibility argument; fail loudly rather than drift
            raise RuntimeError(f"blending schedule missed a deadline at sample {g} (counts {counts})")
        j = nxt[i]
        set_index[g], sample_index[g], nxt[i] = i, j, j + 1
        if j + 1 < counts[i]:
            push(waiting, ((j + 1) * size // counts[i], i))
    return set_index, sample_index


def _epoch_counts(weights: np.ndarray, size: int) -> np.ndarray:
    """Largest-remainder rounding of ``weights * size`` (each within one of its target, summing to ``size``)."""
    target = weights * size
    counts = np.floor(target).astype(np.int64)
    short = size - int(counts.sum())
    if short > 0:
        order = np.argsort(-(target - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def _vision_stats(ss: ShardSet, path: str) -> tuple[int, int]:
    """(tokens_vision, tokens_total) of a set, summed over its shards' sidecars."""
    vision = total = 0
    for shard in ss.shards:
        try:
            vision += int(shard.meta["tokens_vision"])
            total += int(shard.meta["tokens_total"])
        except KeyError as e:
            raise ValueError(f"{shard.prefix}.json: no {e.args[0]!r} count; cannot solve --vision-fraction") from None
    if total <= 0:
        raise ValueError(f"shard set {path}: no real tokens")
    return vision, total


def solve_vision_weights(
    base: Sequence[float], packs: Sequence[int], vision: Sequence[int], total: Sequence[int], target: float
) -> np.ndarray:
    """Sample weights whose expected vision-token share of real tokens is ``target``.

    ``base`` sets the proportions inside the groups of sets above / below the target share; the two groups are then
    scaled so the mix hits the target exactly (in expectation). Per pack a set contributes ``vision_i / packs_i``
    vision and ``total_i / packs_i`` real tokens, so the target is met when
    ``sum_i w_i (vision_i - target * total_i) / packs_i = 0``.
    """
    base = np.asarray(base, dtype=np.float64)
    v = np.asarray(vision, dtype=np.float64) / np.asarray(packs, dtype=np.float64)
    t = np.asarray(total, dtype=np.float64) / np.asarray(packs, dtype=np.float64)
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"--vision-fraction {target} must be in [0, 1]")
    share = v / t
    if target > share.max() + 1e-12 or target < share.min() - 1e-12:
        raise ValueError(
            f"--vision-fraction {target} is unreachable: the sets' vision-token shares are "
            f"{[round(float(s), 4) for s in share]} (a blend can only reach [{share.min():.4f}, {share.max():.4f}])"
        )
    excess = base * (v - target * t)  # per-set contribution to the balance equation at base weights
    excess[np.abs(excess) <= 1e-12 * base * t] = 0.0  # sets sitting on the target (up to rounding)
    plus, minus = excess[excess > 0].sum(), -excess[excess < 0].sum()
    if plus == 0.0 and minus == 0.0:
        return base / base.sum()
    # above-target sets scaled by `minus`, below-target by `plus` (the balance holds); sets on the target are
    # neutral and keep the mean scale; if one side is empty the other side gets weight 0
    scale = np.where(excess > 0, minus, np.where(excess < 0, plus, (plus + minus) / 2))
    w = base * scale
    if w.sum() <= 0:
        raise ValueError(f"--vision-fraction {target}: no positive weights solve the blend")
    return w / w.sum()


class BlendedPacks:
    """Endless deterministic blend of shard sets; index any ``g >= 0`` (see the module docstring for the order)."""

    def __init__(
        self,
        sets: Sequence[ShardSet],
        weights: Sequence[float],
        seed: int,
        samples_per_epoch: int | None = None,
        names: Sequence[str] | None = None,
    ):
        if not sets:
            raise ValueError("a blend needs at least one shard set")
        if len(weights) != len(sets):
            raise ValueError(f"{len(weights)} weights for {len(sets)} shard sets")
        self.sets = list(sets)
        self.names = [str(n) for n in names] if names is not None else [str(s.path) for s in self.sets]
        self.seed = int(seed)
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"blend weights must be finite, >= 0 and not all 0: {w.tolist()}")
        self.set_sizes = np.array([len(s) for s in self.sets], dtype=np.int64)
        for name, n, wi in zip(self.names, self.set_sizes, w):
            if n == 0 and wi > 0:
                raise ValueError(f"shard set {name} holds no packs")
        self.weights = w / w.sum()
        self.seq_length = self._common_seq_length()
        self.token_ids = self._common_token_ids()
        self.samples_per_epoch = int(samples_per_epoch or self.set_sizes.sum())
        self.epoch_counts = _epoch_counts(self.weights, self.samples_per_epoch)
        self._set_index, self._sample_index = blending_indices(self.epoch_counts)
        self._perms: list[OrderedDict[int, np.ndarray]] = [OrderedDict() for _ in self.sets]

    # ---- checks ------------------------------------------------------------------------------------------------
    def _common_seq_length(self) -> int:
        lengths = {name: s.seq_length for name, s in zip(self.names, self.sets)}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"shard sets disagree on seq_length: {lengths}")
        return int(next(iter(lengths.values())))

    def _common_token_ids(self) -> TokenIds:
        ids: TokenIds | None = None
        first = None
        for s in self.sets:
            for shard in s.shards:
                if ids is None:
                    ids, first = shard.ids, shard.prefix
                elif shard.ids != ids:
                    raise ValueError(
                        f"shard sets use different token ids: {shard.prefix} has {shard.ids}, {first} has {ids} "
                        "(built with different tokenizers?)"
                    )
        sums = {name: _tokenizer_checksum(s.manifest) for name, s in zip(self.names, self.sets)}
        known = {k: v for k, v in sums.items() if v is not None}
        if len(set(known.values())) > 1:
            raise ValueError(f"shard sets were built with different tokenizers (manifest checksums): {known}")
        if ids is None:
            raise ValueError(f"shard sets {self.names} hold no shards")
        return ids

    # ---- indexing ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Samples per blend epoch (indexing goes on past it, reshuffled)."""
        return self.samples_per_epoch

    def _perm(self, i: int, set_epoch: int) -> np.ndarray:
        cache = self._perms[i]
        p = cache.get(set_epoch)
        if p is None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, i, set_epoch]))
            n = int(self.set_sizes[i])
            p = rng.permutation(np.arange(n, dtype=np.int32 if n < 2**31 else np.int64))
            cache[set_epoch] = p
            if len(cache) > _PERM_CACHE:
                cache.popitem(last=False)
        else:
            cache.move_to_end(set_epoch)
        return p

    def source_of(self, g: int) -> tuple[int, int]:
        """(set index, pack index in that set) of global sample ``g``."""
        g = int(g)
        if g < 0:
            raise IndexError(f"blend index {g} must be >= 0")
        epoch, t = divmod(g, self.samples_per_epoch)
        i = int(self._set_index[t])
        k = epoch * int(self.epoch_counts[i]) + int(self._sample_index[t])
        set_epoch, r = divmod(k, int(self.set_sizes[i]))
        return i, int(self._perm(i, set_epoch)[r])

    def __getitem__(self, g: int) -> Pack:
        i, j = self.source_of(g)
        return self.sets[i][j]

    def describe(self) -> str:
        """One line per set: name, packs, weight, samples per blend epoch (for the training log)."""
        rows = [
            f"  [{i}] {name}: {n} packs, weight {w:.4f}, {c} samples/epoch ({c / max(n, 1):.2f} passes)"
            for i, (name, n, w, c) in enumerate(zip(self.names, self.set_sizes, self.weights, self.epoch_counts))
        ]
        return "\n".join([f"blend of {len(self.sets)} set(s), {len(self)} samples/epoch, seed {self.seed}:", *rows])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_perms"] = [OrderedDict() for _ in self.sets]  # recomputed on demand
        return state


def _tokenizer_checksum(manifest: dict | None) -> str | None:
    """The tokenizer checksum a manifest records (``tokenizer_checksum`` or ``tokenizer.{checksum,sha256}``)."""
    if not manifest:
        return None
    if manifest.get("tokenizer_checksum"):
        return str(manifest["tokenizer_checksum"])
    tok = manifest.get("tokenizer")
    if isinstance(tok, dict):
        value = tok.get("checksum") or tok.get("sha256")
        return str(value) if value else None
    return None


def build_blend(
    data_path: Sequence[str],
    seed: int,
    vision_fraction: float | None = None,
    samples_per_epoch: int | None = None,
) -> BlendedPacks:
    """Open the shard sets of a Megatron-style ``--data-path`` and blend them.

    With ``vision_fraction`` the weights are solved from the sets' token counts so that vision tokens make up that
    fraction of the blend's real tokens (given weights, or pack counts, set the proportions within the sets above /
    below the target; see :func:`solve_vision_weights`).
    """
    pairs = parse_data_path(data_path)
    paths = [p for _, p in pairs]
    sets = [ShardSet(p) for p in paths]
    for s, p in zip(sets, paths):
        if len(s) == 0:
            raise ValueError(f"shard set {p} holds no packs")
    weights = np.array([w for w, _ in pairs])
    if vision_fraction is not None:
        stats = [_vision_stats(s, p) for s, p in zip(sets, paths)]
        weights = solve_vision_weights(
            weights, [len(s) for s in sets], [v for v, _ in stats], [t for _, t in stats], float(vision_fraction)
        )
    return BlendedPacks(sets, weights, seed, samples_per_epoch=samples_per_epoch, names=[os.fspath(p) for p in paths])


def blend_summary(blend: BlendedPacks) -> str:
    """The blend as JSON (weights, sizes, counts): stored next to checkpoints to check a resume uses the same data."""
    return json.dumps(
        {
            "seed": blend.seed,
            "sets": blend.names,
            "packs": blend.set_sizes.tolist(),
            "weights": blend.weights.tolist(),
            "samples_per_epoch": blend.samples_per_epoch,
        }
    )
