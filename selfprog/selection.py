"""Parent selection and noise-aware acceptance: pure functions over archive rows.

Policies (chosen with `selection.policy`):
- `greedy`: one lineage; the champion has every child, and a child that is
  better (clear of the noise) becomes the champion: the classic keep/discard.
- `archive`: parents drawn with probability rising with score (a sigmoid
  around the archive's median, scaled by its spread) and falling with how
  many children they already have, so promising but under-explored variants
  get their turn. Failed candidates never become parents.
- `map-elites`: a grid over descriptors (parameter count and training
  throughput, in powers of two); the best candidate of each cell is its
  elite, and parents are drawn uniformly from the filled cells.

Acceptance: a score is a mean over evaluations with different seeds; a
candidate counts as better than another only when the difference stands
clear of the noise, beyond `z` standard errors of the difference. The noise
is the run's noise floor: the spread of one evaluation, pooled over every
candidate evaluated more than once (the seed's repeats and the confirmations).
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

POLICIES = ("greedy", "archive", "map-elites")


@dataclass(frozen=True, slots=True)
class Member:
    """A scored candidate as selection sees it."""

    id: int
    scores: tuple[float, ...]  # every evaluation's score
    children: int = 0
    descriptors: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)


def goodness(score: float, minimize: bool) -> float:
    """Returns the score turned so that higher is better."""
    return -score if minimize else score


# ---------------------------------------------------------------------------
# acceptance


@dataclass(frozen=True, slots=True)
class NoiseFloor:
    """The spread of one evaluation, pooled over the candidates evaluated more than once."""

    sd: float
    candidates: int  # how many candidates the pool holds
    dof: int  # its degrees of freedom: the sum of each candidate's evaluations less one

    def __str__(self) -> str:
        if not self.dof:
            return "- (no candidate evaluated twice yet)"
        plural = "" if self.candidates == 1 else "s"
        return (
            f"{self.sd:.4f} (pooled over {self.candidates} candidate{plural}, "
            f"{self.dof} degrees of freedom)"
        )


def noise_floor(repeats: Iterable[Sequence[float]]) -> NoiseFloor:
    """Returns the pooled standard deviation of groups of repeated scores, one group a candidate.

    sd = sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)): each candidate's variance
    weighted by its degrees of freedom. A group of fewer than two scores has
    no spread and is left out; with none left, sd is 0.
    """
    groups = [g for g in repeats if len(g) > 1]
    dof = sum(len(g) - 1 for g in groups)
    squares = sum((len(g) - 1) * statistics.variance(g) for g in groups)
    return NoiseFloor(math.sqrt(squares / dof) if dof else 0.0, len(groups), dof)


def own_spread(member: Member) -> float:
    """Returns the standard deviation of a member's own scores (0 with one)."""
    return statistics.stdev(member.scores) if len(member.scores) > 1 else 0.0


def standard_error(member: Member, spread: float) -> float:
    """Returns the standard error of a member's mean when one evaluation spreads by `spread`."""
    return spread / math.sqrt(len(member.scores))


def clearly_better(a: Member, b: Member, noise: float, z: float, minimize: bool) -> bool:
    """Returns whether challenger a beats incumbent b by more than z standard errors of the difference.

    `noise` is the run's noise floor (`noise_floor`), and both means are
    measured against it rather than against their own few evaluations: the
    spread of 3 evaluations is itself a poor estimate (90% of the time it falls
    between 0.23 and 1.73 times the true spread), and an incumbent held to its
    own spread stalls the whole run when a busy moment inflated it. A seed whose
    3 evaluations spread by 1.9 bits on a busy machine kept every child that
    scored 2 bits better (spreads of 0.01) from being accepted.

    The challenger alone is also held to its own spread where that is larger
    (once re-evaluated: one evaluation shows none). A genuinely noisy
    program's spread enters the pool, but diluted by every quiet candidate's,
    so the pool alone would accept it on a lucky mean. Overstating one
    challenger's error costs that challenger only, whereas an incumbent's
    would block every child after it; and every incumbent but the seed met its
    own spread when it was accepted. In bench/noise.py (even noise) this costs
    about 1% of true keeps against the pool alone, within the bench's noise.
    """
    gap = goodness(a.mean, minimize) - goodness(b.mean, minimize)
    challenger = standard_error(a, max(noise, own_spread(a)))
    return gap > z * math.hypot(challenger, standard_error(b, noise))


def looks_better(a: Member, b: Member, minimize: bool) -> bool:
    """Returns whether a's mean beats b's at all: the trigger for re-evaluating a."""
    return goodness(a.mean, minimize) > goodness(b.mean, minimize)


def needs_confirmation(child: Member, best: Member, noise: float, z: float, minimize: bool) -> bool:
    """Returns whether a child should be evaluated again before it is judged.

    Only a child that looks better but not yet clearly better is worth more
    evaluations: a clear win needs no more, and one that looks worse is not kept.
    """
    return looks_better(child, best, minimize) and not clearly_better(
        child, best, noise, z, minimize
    )


def final_round(
    members: Sequence[Member],
    finalists: int,
    confirm_seeds: int,
    minimize: bool,
    asked: Iterable[int] = (),
) -> tuple[Member, list[int]]:
    """Returns the member with the best mean and, while it is not confirmed, who to evaluate again.

    A member is confirmed once it has `confirm_seeds` scores. While the best
    mean is not confirmed, the unconfirmed among the best `finalists` are
    evaluated again, together: a lucky mean falls, and whoever then leads is
    asked about in turn. A member whose evaluations were `asked` for and
    still fall short failed one of them (a timeout, a non-finite score): it
    cannot be picked on the lucky score it has, unless no member is left.
    Ties go to the earlier id.

    Raises:
        ValueError: no member.
    """
    if not members:
        raise ValueError("no scored candidate to pick from")
    done = set(asked)
    failed = {m.id for m in members if m.id in done and len(m.scores) < confirm_seeds}
    pool = [m for m in members if m.id not in failed] or list(members)
    ranked = sorted(pool, key=lambda m: (-goodness(m.mean, minimize), m.id))
    short = [m.id for m in ranked[:finalists] if len(m.scores) < confirm_seeds and m.id not in done]
    return ranked[0], (short if ranked[0].id in short else [])


def champion(
    members: Sequence[Member], accepted: Sequence[int], minimize: bool = True
) -> Member | None:
    """Returns the accepted member with the best mean, the earliest among equals.

    Each acceptance beats the champion before it, so this is the head of the
    kept lineage; it differs only once a final pick's confirmations have
    lowered a lucky mean (`Judge.finalize`).
    """
    by_id = {m.id: m for m in members}
    kept = [by_id[i] for i in accepted if i in by_id]
    if not kept:
        return None
    return max(kept, key=lambda m: goodness(m.mean, minimize))  # max keeps the first


# ---------------------------------------------------------------------------
# parent selection


def _sigmoid(x: float) -> float:
    """Returns 1 / (1 + e^-x) without overflow, however far x is from 0."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)  # underflows to 0 for a member far worse than the median: never drawn
    return e / (1.0 + e)


def archive_probabilities(
    members: Sequence[Member], minimize: bool, sharpness: float = 10.0
) -> dict[int, float]:
    """Returns each member's chance of being drawn as a parent.

    The weight is sigmoid(sharpness * (goodness - median) / spread) / (1 + children),
    spread being the archive's interquartile range (or 1 with too few members).
    """
    if not members:
        return {}
    values = [goodness(m.mean, minimize) for m in members]
    median = statistics.median(values)
    if len(values) >= 4:
        q = statistics.quantiles(values, n=4)
        spread = q[2] - q[0]
    else:
        spread = max(values) - min(values)
    spread = spread or 1.0
    weights = {
        m.id: _sigmoid(sharpness * (v - median) / spread) / (1 + m.children)
        for m, v in zip(members, values, strict=True)
    }
    total = sum(weights.values())
    return {i: w / total for i, w in weights.items()}


def cell(descriptors: dict[str, float], keys: Sequence[str]) -> tuple[int, ...]:
    """Returns a member's grid cell: each descriptor binned by powers of two."""
    return tuple(math.floor(math.log2(max(descriptors.get(k, 1.0), 1.0))) for k in keys)


def elites(
    members: Sequence[Member], minimize: bool, keys: Sequence[str]
) -> dict[tuple[int, ...], Member]:
    """Returns the best member of each filled cell of the descriptor grid."""
    grid: dict[tuple[int, ...], Member] = {}
    for m in members:
        key = cell(m.descriptors, keys)
        if key not in grid or goodness(m.mean, minimize) > goodness(grid[key].mean, minimize):
            grid[key] = m
    return grid


def select(
    policy: str,
    members: Sequence[Member],
    population: int,
    rng: random.Random,
    minimize: bool,
    accepted: Sequence[int] = (),
    descriptor_keys: Sequence[str] = ("params", "throughput"),
    sharpness: float = 10.0,
) -> list[tuple[int, int]]:
    """Returns (parent, children) pairs for the next generation, parents in id order.

    Raises:
        ValueError: an unknown policy, or no member to choose from.
    """
    if not members:
        raise ValueError("no scored candidate to select parents from")
    if policy == "greedy":
        head = champion(members, accepted, minimize) or members[0]
        return [(head.id, population)]
    if policy == "archive":
        chances = archive_probabilities(members, minimize, sharpness)
        ids = sorted(chances)
        draws = rng.choices(ids, weights=[chances[i] for i in ids], k=population)
    elif policy == "map-elites":
        ids = sorted(m.id for m in elites(members, minimize, descriptor_keys).values())
        draws = [rng.choice(ids) for _ in range(population)]
    else:
        raise ValueError(
            f"unknown selection policy {policy!r}; choose one of {', '.join(POLICIES)}"
        )
    return sorted(Counter(draws).items())
