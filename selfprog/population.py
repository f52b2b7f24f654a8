"""The archive as selection sees it: scored members, the noise floor, the champion, parents."""

from __future__ import annotations

import hashlib
import random

from selfprog.errors import SelfprogError
from selfprog.rundir import Run
from selfprog.selection import Member, NoiseFloor, champion, noise_floor, select
from selfprog.states import UNFINISHED


def derive_seed(*parts: object) -> int:
    """Returns a stable 32-bit seed from the parts (Python's hash() changes between processes)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


class Population:
    """Answers selection's questions about a run from its archive as it stands."""

    def __init__(self, run: Run):
        self.run = run
        self.archive = run.archive
        self.minimize = run.target.minimize
        self.descriptors = run.target.descriptors  # map-elites' grid: the target's to declare
        self._members: tuple[tuple[int, int], list[Member]] | None = None

    def members(self) -> list[Member]:
        """Returns every candidate that ended `ok`, with its scores and children so far.

        Kept until the archive changes: the driver asks several times between two writes.
        """
        revision = self.archive.revision()
        if self._members is None or self._members[0] != revision:
            children = self.archive.children_counts()
            scores = self.archive.scores_of()
            members = []
            keys = self.descriptors if self.run.config.selection.policy == "map-elites" else ()
            for cid, metrics in self.archive.scored_metrics(keys).items():
                if cid in scores:
                    descriptors = {k: float(v) for k, v in metrics.items()}
                    members.append(
                        Member(cid, tuple(scores[cid]), children.get(cid, 0), descriptors)
                    )
            self._members = (revision, members)
        return list(self._members[1])

    def noise_floor(self) -> NoiseFloor:
        """Returns the noise floor now: pooled over every candidate evaluated more than once.

        Read from the archive as it stands, so it is re-estimated with every
        confirmation: one busy moment during the seed's evaluations no longer
        sets the noise for the whole run.
        """
        return noise_floor(self.archive.repeated_scores().values())

    def noise(self) -> float:
        """Returns the noise floor's standard deviation: the spread of one evaluation."""
        return self.noise_floor().sd

    def champion(self) -> Member | None:
        """Returns the champion: the accepted candidate with the best mean, if any."""
        return champion(self.members(), self.archive.accepted_ids(), self.minimize)

    def can_select(self) -> bool:
        """Returns whether parents can be drawn now, or an unscored seed is the only choice.

        With no scored candidate and work still being scored, the answer is to
        wait: what is being scored may yet become a parent.
        """
        if self.members():
            return True
        seed = self.archive.seed()
        if seed is not None and seed.state in UNFINISHED and self.archive.last_planned() == 0:
            return True  # the seed is the first generation's parent, scored or not
        return not self.archive.due_evaluations(self.run.config.run.seed)  # else: say why not

    def select(self, generation: int) -> list[tuple[int, int]]:
        """Returns the (parent, children) pairs for a generation, drawn by the run's policy.

        Raises:
            SelfprogError: no candidate has scored `ok`, so there is no parent.
        """
        config = self.run.config
        members = self.members()
        seed = self.archive.seed()
        first = self.archive.last_planned() == 0
        if not members and first and seed is not None and seed.state in UNFINISHED:
            # steady state: the first children are bred while the seed is scored; it is their parent
            return [(seed.id, config.run.population)]
        if not members:
            ended = f"{seed.state} ({seed.reason})" if seed else "unrecorded"
            raise SelfprogError(
                f"no candidate has scored `ok`, so none can be a parent: the seed ended "
                f"{ended}; try `selfprog eval` on the target"
            )
        rng = random.Random(derive_seed(config.run.seed, "select", generation))
        return select(
            config.selection.policy,
            members,
            config.run.population,
            rng,
            self.minimize,
            self.archive.accepted_ids(),
            self.descriptors,
            config.selection.sharpness,
        )
