"""A run in an MLflow tracker: one parent run for the selfprog run, one nested run per candidate.

Re-exporting finds what an earlier export wrote by its tags and adds only the
candidates that are new. Candidates still pending or running are left for a
later export: an MLflow param cannot change once logged, and their state,
score and log are not known yet. Only this module imports `mlflow`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfprog.errors import SelfprogError
from selfprog.queries import evaluations, last_finished, times
from selfprog.records import Candidate
from selfprog.rundir import CONFIG_FILE, Run, lock_holder
from selfprog.settings import numbers as tunable_literals
from selfprog.states import FAILED, UNFINISHED, State
from selfprog.untrusted import clean

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow 3's own default; its plain file store refuses to start
INSTALL = "export --mlflow needs MLflow: pip install 'selfprog[mlflow]'"
log = logging.getLogger(__name__)

RUN_TAG, ROLE_TAG, CANDIDATE_TAG = "selfprog.run_id", "selfprog.role", "selfprog.candidate"
EVALUATIONS_TAG = "selfprog.evaluations"  # how many evaluations a candidate's run holds
TERMINAL = ("FINISHED", "FAILED", "KILLED")
TAG_CHARS = 5000  # of a rationale or reason: under MLflow's limit on a tag's value (8000 in 3.x)
PARAM_CHARS = 6000  # MLflow 3's limit on a param's value
BATCH = 100  # MLflow takes at most 100 params or tags in one batch
READ_CHUNK = 200  # candidates read whole (diff, log tail) at a time
_BAD_KEY = re.compile(r"[^\w./\- ]")


class TrackerError(SelfprogError):
    """MLflow is not installed, or cannot use the tracking URI."""


@dataclass(frozen=True, slots=True)
class Exported:
    """What one export did: how many candidates it added, found already there, or left for later."""

    uri: str
    experiment: str
    new: int
    already: int
    unfinished: int
    caught_up: int = 0  # exported before, with evaluations added since
    failed: int = 0  # MLflow refused them (the log says why); the next export tries again

    @property
    def total(self) -> int:
        return self.new + self.already


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Returns nested settings as `section.key` = text, as MLflow params are."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[f"{prefix}{key}"] = text[:PARAM_CHARS]
    return flat


def settings(files: Mapping[str, str]) -> dict[str, int | float]:
    """Returns a program's numeric settings as `mutate` finds them, keyed `file/name`."""
    found: dict[str, int | float] = {}
    for path in sorted(files):
        if not path.endswith(".py"):
            continue
        try:
            literals = tunable_literals(path, files[path])
        except (SyntaxError, ValueError, RecursionError):
            continue
        for lit in literals:
            key, n = f"{path}/{lit.name}", 2
            while key in found:  # the same name in a second class body
                key, n = f"{path}/{lit.name}#{n}", n + 1
            found[key] = lit.number
    return found


def changed_settings(
    old: Mapping[str, int | float], new: Mapping[str, int | float]
) -> dict[str, str]:
    """Returns the settings that differ between two programs' `settings`: `old -> new` by key."""
    return {
        key: f"{old.get(key, '-')} -> {new.get(key, '-')}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) or type(old.get(key)) is not type(new.get(key))
    }


def status_of(state: str) -> str:
    """Returns the MLflow status of a finished candidate's state."""
    if state == State.OK.value:
        return "FINISHED"
    return "FAILED" if state in FAILED else "KILLED"  # a duplicate was never trained


def _key(text: str) -> str:
    """Returns a name MLflow takes as it is: its characters, no empty, '.' or '..' parts."""
    parts = [p for p in _BAD_KEY.sub("_", text).split("/") if p.strip(" ") not in ("", ".", "..")]
    return "/".join(parts)[:250].strip("/ ") or "unnamed"


def _number(value: Any) -> float | None:
    """Returns a metric's value as MLflow stores it, or None (not a number, or beyond a double)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int of 400 digits
        return None
    return number if math.isfinite(number) else None


def _millis(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


def _errors() -> tuple[type[BaseException], ...]:
    """Returns what MLflow raises about a store it cannot use."""
    from mlflow.exceptions import MlflowException

    found: tuple[type[BaseException], ...] = (MlflowException, OSError)
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:
        return found
    return (*found, SQLAlchemyError)


def _first_line(exc: BaseException) -> str:
    return next((s.strip() for s in str(exc).splitlines() if s.strip()), type(exc).__name__)


def connect(uri: str) -> MlflowClient:
    """Returns a client of the tracker at uri, checked by one question.

    Raises:
        TrackerError: MLflow is not installed, or cannot use uri.
    """
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise TrackerError(INSTALL) from None
    # MLflow 3.9 sets alembic's logger to INFO when imported: a line per database set-up step
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if uri.startswith("sqlite:"):
        try:
            import alembic  # noqa: F401  (MLflow's database store needs both)
            import sqlalchemy  # noqa: F401
        except ImportError:
            raise TrackerError(INSTALL) from None
    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except _errors() as exc:
        raise TrackerError(f"MLflow cannot use {uri}: {_first_line(exc)}") from None
    return client


def _artifact_root(uri: str, experiment: str) -> str | None:
    """Returns where an experiment's artifacts go in a local database: beside it (mlruns/NAME),
    whatever the working folder."""
    if not uri.startswith("sqlite:///"):
        return None  # a server or remote database knows its own artifact store
    database = Path(urllib.parse.unquote(uri[len("sqlite:///") :])).resolve()
    return (database.parent / "mlruns" / experiment).as_uri()


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """Returns the id of the experiment named name, made if it does not exist."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return str(client.create_experiment(name, artifact_location=_artifact_root(uri, name)))
    if found.lifecycle_stage != "active":
        raise TrackerError(
            f"experiment {name!r} is deleted in {uri}: restore it (`mlflow experiments restore`) "
            "or remove it for good (`mlflow gc`)"
        )
    return str(found.experiment_id)


def _batches(items: Mapping[str, Any]) -> Iterator[list[tuple[str, Any]]]:
    pairs = list(items.items())
    for start in range(0, len(pairs), BATCH):
        yield pairs[start : start + BATCH]


def _log(
    client: MlflowClient,
    run_id: str,
    params: Mapping[str, str] = {},
    tags: Mapping[str, str] = {},
    metrics: Sequence[tuple[str, float, int, int]] = (),
) -> None:
    """Logs params, tags and metrics (key, value, time in ms, step) within MLflow's batch limits."""
    from mlflow.entities import Metric, Param, RunTag

    for part in _batches(params):
        client.log_batch(run_id, params=[Param(_key(k), v) for k, v in part], synchronous=True)
    for part in _batches(tags):
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in part], synchronous=True)
    for start in range(0, len(metrics), BATCH * 10):
        points = [Metric(_key(k), v, t, s) for k, v, t, s in metrics[start : start + BATCH * 10]]
        client.log_batch(run_id, metrics=points, synchronous=True)


def existing(client: MlflowClient, experiment: str, run_id: str) -> dict[str, Any]:
    """Returns this selfprog run's MLflow runs already in the experiment, by candidate id
    ("run" for the parent)."""
    found: dict[str, Any] = {}
    token: str | None = None
    while True:
        quote = '"' if "'" in run_id else "'"  # a folder name may hold either, rarely both
        page = client.search_runs(
            [experiment],
            f"tags.`{RUN_TAG}` = {quote}{run_id}{quote}",
            max_results=1000,
            page_token=token,
        )
        for mlrun in page:
            tags = mlrun.data.tags
            found[tags.get(CANDIDATE_TAG, tags.get(ROLE_TAG, ""))] = mlrun
        token = page.token
        if not token:
            return found


def _parent(client: MlflowClient, run: Run, experiment: str, found: Any | None) -> str:
    """Returns the MLflow run of the selfprog run, made or brought up to date."""
    config = flatten(run.config.to_json())
    if found is None:
        created = float(run.archive.meta("created") or time.time())
        tags = {
            RUN_TAG: run.run_id,
            ROLE_TAG: "run",
            "mlflow.runName": run.root.name,
            "selfprog.run_path": str(run.root.resolve()),
            "selfprog.target": run.target.name,
            "selfprog.metric": run.target.metric,
            "selfprog.direction": run.target.direction,
        }
        mlrun = client.create_run(experiment, start_time=_millis(created), tags=tags)
        parent_id: str = mlrun.info.run_id
        _log(client, parent_id, params=config)
        with tempfile.TemporaryDirectory() as folder:
            for name in (*run.target.files, "target.toml"):
                _write(Path(folder) / "target", name, (run.target.root / name).read_text())
            _write(Path(folder), CONFIG_FILE, (run.root / CONFIG_FILE).read_text())
            client.log_artifacts(parent_id, folder)
        return parent_id
    parent_id = found.info.run_id
    logged = found.data.params
    # a config steered mid-run (`resume --set`): a param cannot change, a tag can
    _log(client, parent_id, params={k: v for k, v in config.items() if _key(k) not in logged})
    steered = {f"config.{k}": v for k, v in config.items() if logged.get(_key(k), v) != v}
    _log(client, parent_id, tags=steered)
    return str(parent_id)


def _finish_parent(client: MlflowClient, run: Run, parent_id: str) -> None:
    """Logs the run's headline numbers now, and ends the parent once no driver holds the run."""
    now = _millis(time.time()) or 0
    best = run.archive.best(run.target.minimize, 1, accepted=True) or run.archive.best(
        run.target.minimize, 1
    )
    seed = run.archive.seed()
    counts = run.archive.counts()
    metrics = [
        ("candidates", float(sum(counts.values())), now, 0),
        ("ok", float(counts.get(State.OK.value, 0)), now, 0),
    ]
    if best:
        metrics.append(("best_score", float(best[0].score or 0.0), now, 0))
    if seed is not None and seed.score is not None:
        metrics.append(("seed_score", float(seed.score), now, 0))
    _log(client, parent_id, metrics=metrics)
    if lock_holder(run.root) is None and not any(counts.get(s, 0) for s in UNFINISHED):
        last = last_finished(run.archive)
        client.set_terminated(parent_id, "FINISHED", end_time=_millis(last) or now)


def _write(folder: Path, name: str, text: str) -> None:
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):  # a name from the archive, not a path out
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class _Writer:
    """Writes a run's finished candidates as nested runs of its parent run."""

    def __init__(self, client: MlflowClient, run: Run, experiment: str, parent_id: str):
        self.client, self.run, self.experiment, self.parent_id = client, run, experiment, parent_id
        self.settings: dict[str, dict[str, int | float]] = {}  # by program hash: parents recur

    def _settings(self, phash: str | None) -> dict[str, int | float] | None:
        if phash is not None and phash not in self.settings:
            self.settings[phash] = settings(self.run.archive.program(phash))
        return None if phash is None else self.settings[phash]

    def params(self, c: Candidate) -> dict[str, str]:
        """Returns a candidate's params: where it sits, and the settings it changed."""
        params = {
            "candidate": str(c.id),
            "parent": str(c.parent_id) if c.parent_id is not None else "none",
            "generation": str(c.generation),
            "state": c.state,
        }
        after = self._settings(c.program_hash)
        if c.parent_id is not None and after is not None:
            before = self._settings(self.run.archive.candidate(c.parent_id).program_hash)
            for key, change in changed_settings(before, after).items() if before else ():
                params[f"changed/{key}"] = change
        return params

    def write(self, c: Candidate) -> None:
        """Writes one finished candidate: params, metrics, artifacts, status and times."""
        archive = self.run.archive
        created, finished = times(archive, c.id)
        ended = _millis(finished or created) or 0  # one never trained ends where it began
        tags = {
            RUN_TAG: self.run.run_id,
            ROLE_TAG: "candidate",
            CANDIDATE_TAG: str(c.id),
            "mlflow.parentRunId": self.parent_id,
            "mlflow.runName": f"candidate {c.id}",
            "selfprog.rationale": c.rationale[:TAG_CHARS],
        }
        if c.reason:
            tags["selfprog.reason"] = c.reason[:TAG_CHARS]
        mlrun = self.client.create_run(self.experiment, start_time=_millis(created), tags=tags)
        run_id = mlrun.info.run_id
        files = archive.program(c.program_hash) if c.program_hash else {}
        metrics = [
            (k, number, ended, 0)
            for k, number in ((k, _number(v)) for k, v in c.metrics.items())
            if number is not None and _key(k) not in ("score", "mean_score")
        ]
        scored = evaluations(archive, c.id)
        metrics += self._scores(scored, 0)
        if scored:  # the first evaluation's training curve, the step in thousandths of the budget
            metrics += [
                ("train_loss", loss, ended, round(f * 1000)) for f, loss in scored[0]["curve"]
            ]
        if c.score is not None:
            metrics.append(("mean_score", float(c.score), ended, 0))
        _log(self.client, run_id, params=self.params(c), metrics=metrics)
        self.client.set_tag(run_id, EVALUATIONS_TAG, str(len(scored)))
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            if c.diff:
                _write(root, "diff.patch", c.diff)
            if c.log_tail:
                _write(root, "log_tail.txt", clean(c.log_tail))
            for name, text in files.items():
                _write(root / "source", name, text)
            if any(root.iterdir()):
                self.client.log_artifacts(run_id, folder)
        self.client.set_terminated(run_id, status_of(c.state), end_time=ended)

    @staticmethod
    def _scores(scored: list[dict[str, Any]], first: int) -> list[tuple[str, float, int, int]]:
        """Returns the `score` points of evaluations from index first on (the step is the index)."""
        return [
            ("score", float(e["score"]), _millis(e["created"]) or 0, step)
            for step, e in enumerate(scored)
            if step >= first and e["score"] is not None
        ]

    def catch_up(self, c: Candidate, mlrun: Any) -> bool:
        """Adds the evaluations a candidate had since it was exported; returns whether any."""
        scored = evaluations(self.run.archive, c.id)
        known = int(mlrun.data.tags.get(EVALUATIONS_TAG, "0") or 0)
        if len(scored) <= known:
            return False
        run_id = mlrun.info.run_id
        points = self._scores(scored, known)
        if c.score is not None:
            points.append(("mean_score", float(c.score), points[-1][2] if points else 0, known))
        _log(self.client, run_id, metrics=points)
        self.client.set_tag(run_id, EVALUATIONS_TAG, str(len(scored)))
        return True


def export(run: Run, uri: str, progress: Callable[[int, int], None] | None = None) -> Exported:
    """Writes a run into the MLflow tracker at uri; returns what it added.

    The experiment is named after the target (`selfprog-tinylm`), so the runs
    of one target sit side by side; progress is told (done, to do) as it goes.

    Raises:
        TrackerError: MLflow is not installed, or cannot use uri.
    """
    client = connect(uri)
    name = f"selfprog-{run.target.name}"
    try:
        exp = experiment_id(client, name, uri)
        found = existing(client, exp, run.run_id)
        writer = _Writer(client, run, exp, _parent(client, run, exp, found.get("run")))
        todo, there_ok, unfinished = [], [], 0
        for s in run.archive.summaries():
            there = found.get(str(s.id))
            if s.state in UNFINISHED:
                unfinished += 1
            elif there is not None and there.info.status in TERMINAL:
                there_ok.append(s.id)
            else:
                if there is not None:  # an export stopped halfway through this candidate
                    client.delete_run(there.info.run_id)
                todo.append(s.id)
        caught_up = sum(
            writer.catch_up(c, found[str(c.id)])
            for start in range(0, len(there_ok), READ_CHUNK)
            for c in run.archive.candidates(there_ok[start : start + READ_CHUNK])
        )
        done, failed = 0, 0
        for start in range(0, len(todo), READ_CHUNK):
            for c in run.archive.candidates(todo[start : start + READ_CHUNK]):
                try:
                    writer.write(c)
                except _errors() as exc:  # this candidate's; the others still go
                    log.warning("candidate %d: not exported: %s", c.id, _first_line(exc))
                    failed += 1
                done += 1
                if progress is not None:
                    progress(done, len(todo))
        _finish_parent(client, run, writer.parent_id)
    except _errors() as exc:
        raise TrackerError(f"cannot export to {uri}: {_first_line(exc)}") from None
    return Exported(uri, name, len(todo) - failed, len(there_ok), unfinished, caught_up, failed)


def default_uri() -> str:
    """Returns the tracker to export to when none is named: MLFLOW_TRACKING_URI, else a local
    database in the working folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
