"""The study: options checked and the study made (or found again, with its parent run) before
any trial, its storage, sampler and pruner, how many trials its budget leaves, and how it
ended.

    prepare(...)  -> the command line's options checked, then `plan`
    plan(...)     -> the study and its parent run, made or found again (a study continues)
    outcome(...)  -> how many trials ended how, and the best
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, ProgrammingError, SQLAlchemyError

from .. import data, engine, processes, registry, search_space
from ..config import SweepConfig, TrainConfig, changes_training, flag
from ..recipes import ONE_CYCLE_WARMUP
from ..tracking import lifecycle, store
from . import parent_run

if TYPE_CHECKING:
    from .confirm import Verdict

log = logging.getLogger(__name__)

# What the study keeps for every worker and machine to find.
PARENT_ATTR = "mlflow_parent_run_id"
SETTINGS_ATTR = "settings"
FAILURE_ATTR = "failure"
# A trial asked for after the budget was spent (workers raced for the last one): not run.
SURPLUS_ATTR = "surplus"
# The median pruner waits for this many finished trials before it compares (Optuna's default).
STARTUP_TRIALS = 5


class SweepError(ValueError):
    """The sweep cannot start or go on as asked; the message says why."""


@dataclass(frozen=True)
class Plan:
    """What every worker needs, picklable for the processes it starts in."""

    sweep: SweepConfig
    base: dict[str, Any]  # the TrainConfig options every trial shares
    space: search_space.Space
    study_name: str
    storage: str
    parent_run_id: str
    tracking_uri: str
    deadline: float | None  # no trial starts after this time.time()
    threads: int  # torch threads per worker: its share of the cores
    register_as: str | None = None  # the model name the best trial is registered under

    @property
    def budget(self) -> int:
        if self.sweep.sampler == "grid":
            return min(
                self.sweep.trials, math.prod(map(len, search_space.grid(self.space).values()))
            )
        return self.sweep.trials


@dataclass(frozen=True)
class Outcome:
    study_name: str
    parent_run_id: str
    states: dict[str, int]  # how many trials ended in each state
    budget: int  # the trials the study runs in all
    best: FrozenTrial | None
    verdict: Verdict | None = None  # the confirmation's, when the best trials were confirmed
    registration: registry.Registration | None = None  # the winner's, once registered

    @property
    def best_run_id(self) -> str | None:
        return self.best.user_attrs.get(parent_run.RUN_ATTR) if self.best is not None else None

    @property
    def chosen_run_id(self) -> str | None:
        """The run to register: the confirmed winner's best, else the best trial's."""
        return self.verdict.best_run_id if self.verdict is not None else self.best_run_id


def prepare(
    sweep: SweepConfig, options: dict[str, Any], fixed: set[str], project_run: str | None
) -> Plan:
    """Check a sweep as the command line asks for it, then plan it: every option `fixed` for
    all trials, the space, the store, this login's permission and the data, before any trial.

    Raises ConfigError, SpaceError, DataError, DeviceUnavailable, TrackingError or
    SweepError, each before a trial starts.
    """
    # A recipe may differ by device (CUDA_RECIPES), so "auto" is settled first.
    base = {**options, "device": engine.Runtime.resolve(options["device"]).device.type}
    checked = TrainConfig(**base)
    space = search_space.load(sweep.space, checked.model, leave_out=fixed)
    both = sorted(fixed & set(space))
    if both:
        flags = ", ".join(map(flag, both))
        raise search_space.SpaceError(
            f"{flags}: fixed for every trial, and searched by the space; give one or the other"
        )
    store.check_store()
    if project_run is None:  # else `mlflow run` has made the parent run already
        store.check_can_train_in(checked.experiment_name)
    data.load_dataset(checked.data)  # bad data is refused now, and the workers read it decoded
    planned = plan(sweep, base, space, project_run)
    register_as = checked.model_name if checked.register else None
    return dataclasses.replace(planned, register_as=register_as)


def plan(
    sweep: SweepConfig, base: dict[str, Any], space: search_space.Space,
    project_run: str | None = None,
) -> Plan:  # fmt: skip
    """Find the study (or make it, with its parent run) and check that it searches as asked.

    Under `mlflow run`, a new study's parent is `project_run`, the run it made; a study that
    exists keeps its own parent, which `mlflow run --run-id` continues.
    """
    experiment_name = store.experiment_of(project_run) if project_run else base["experiment_name"]
    base = {**base, "experiment_name": experiment_name, "register": False}
    study_name = sweep.study or f"{experiment_name}-{base['model']}"
    if sweep.sampler == "grid":
        search_space.grid(space)  # a range without a grid is refused now, not in a worker
    storage = sweep.storage or default_storage()
    settings = _settings(base, space)
    try:
        study = optuna.create_study(study_name=study_name, storage=rdb_storage(storage),
                                    direction="maximize")  # fmt: skip
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=rdb_storage(storage))
        parent = _existing_parent(study, settings)
    else:
        study.set_user_attr(SETTINGS_ATTR, settings)
        parent = project_run or lifecycle.start_parent_run(experiment_name, study_name)
        client = mlflow.MlflowClient()
        client.set_tag(parent, parent_run.STUDY_TAG, study_name)
        client.update_run(parent, name=study_name)  # `mlflow run` named its run at random
        study.set_user_attr(PARENT_ATTR, parent)
        parent_run.log_settings(parent, sweep, base, space, shown(storage))
        recipe = _recipe_point(base, space)
        if recipe and sweep.sampler != "grid":  # a grid's points are its own
            study.enqueue_trial(recipe)  # the first trial is the recipe: a sweep starts from it
    store.mark_as_training(mlflow.MlflowClient().get_run(parent).info.experiment_id)
    if project_run not in (None, parent):
        raise SweepError(
            f"study {study_name} already has its parent run {parent}, and `mlflow run` made a "
            f"new one ({project_run}); continue the study in its own run: mlflow run . -e sweep "
            f"--run-id {parent} ... (the same parameters)"
        )
    threads = processes.threads_per_worker(sweep.workers)
    deadline = time.time() + sweep.timeout if sweep.timeout else None
    return Plan(sweep, base, space, study_name, storage, parent, store.tracking_uri(),
                deadline, threads)  # fmt: skip


def default_storage() -> str:
    """optuna.db beside a SQLite tracking store, or in this folder."""
    database = store.sqlite_file()
    folder = database.parent if database is not None else Path.cwd()
    return f"sqlite:///{folder / 'optuna.db'}"


def shown(storage: str) -> str:
    """A storage URL without its password, to log and print."""
    try:
        return make_url(storage).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL at all: at least leave out what precedes a host
        return storage.rpartition("@")[2]


def rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage at `url`; SweepError, in one line without the password, if unusable."""
    try:
        for pause in (1, 2, 3, 4):
            try:
                return _connect(url)
            except (IntegrityError, ProgrammingError):
                # Machines that start together on an empty database all create Optuna's
                # tables; all but one find them made meanwhile, and look again.
                time.sleep(pause)
        return _connect(url)
    except (ImportError, ValueError, SQLAlchemyError) as error:  # no driver, a bad URL
        raise SweepError(
            f"cannot use the Optuna storage {shown(url)}: {processes.one_line(error)}"
        ) from None


def _connect(url: str) -> optuna.storages.RDBStorage:
    # SQLite takes one writer at a time: workers wait their turn instead of failing at once.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # A trial whose worker was killed outright stops beating and is failed after the
        # grace period, so it neither holds a place in the budget nor counts in it.
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=30, grace_period=120
        )


def sampler(plan: Plan, seed: int) -> optuna.samplers.BaseSampler:
    if plan.sweep.sampler == "grid":
        return optuna.samplers.GridSampler(search_space.grid(plan.space), seed=seed)
    if plan.sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    warmup = warmup_epochs(epochs)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=warmup)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=warmup, max_resource=epochs)
    return optuna.pruners.NopPruner()


def warmup_epochs(epochs: int) -> int:
    """The epoch by whose end the one-cycle warm-up is over: no trial is judged before it."""
    return max(1, math.ceil(ONE_CYCLE_WARMUP * epochs))


def counts(trial: FrozenTrial) -> bool:
    """Whether a finished trial spends the budget: interrupted and surplus ones do not."""
    if trial.state == TrialState.FAIL:
        return FAILURE_ATTR in trial.user_attrs
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def fail_stale(optuna_study: optuna.Study) -> None:
    """Fail the trials of workers killed outright (they stopped beating), so that they neither
    hold a place in the budget nor keep others waiting."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(optuna_study)


def open_slots(study: optuna.Study, budget: int) -> int:
    trials = study.get_trials(deepcopy=False)
    return budget - sum(counts(t) or t.state == TrialState.RUNNING for t in trials)


def taken_before(trial: optuna.Trial) -> int:
    """Trials numbered before this one that spend the budget, or may (still running)."""
    earlier = trial.study.get_trials(deepcopy=False)
    return sum(
        t.number < trial.number and (counts(t) or t.state == TrialState.RUNNING) for t in earlier
    )


def trials_run(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials, less the surplus ones that were never run."""
    return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR)]


def ranked(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The complete trials, best validation accuracy first; the earliest of equals first."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return sorted(complete, key=lambda t: (t.value, -t.number), reverse=True)


def best(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The complete trial with the best validation accuracy; the earliest of equals."""
    return next(iter(ranked(trials)), None)


def search(plan: Plan) -> optuna.Study:
    """The plan's search study, as stored (its trials so far)."""
    return optuna.load_study(study_name=plan.study_name, storage=rdb_storage(plan.storage))


def outcome(plan: Plan) -> Outcome:
    study = search(plan)
    trials = trials_run(study)
    states = Counter(
        "failed" if t.state == TrialState.FAIL and FAILURE_ATTR in t.user_attrs
        else "interrupted" if t.state == TrialState.FAIL
        else t.state.name.lower()
        for t in trials
    )  # fmt: skip
    return Outcome(plan.study_name, plan.parent_run_id, dict(states), plan.budget, best(trials))


def _settings(base: dict[str, Any], space: search_space.Space) -> dict[str, Any]:
    """What makes trials comparable: the space and every option that changes training."""
    options = {k: v for k, v in base.items() if changes_training(k)}
    searched = {name: dataclasses.asdict(dimension) for name, dimension in space.items()}
    return json.loads(json.dumps({"space": searched, "options": options}))


def _recipe_point(base: dict[str, Any], space: search_space.Space) -> dict[str, Any]:
    """The values the searched options take unsearched (the model's recipe), if the space
    holds them all; else nothing."""
    recipe = dataclasses.asdict(TrainConfig(**base))
    point = {name: recipe[name] for name in space}
    return point if all(space[name].holds(value) for name, value in point.items()) else {}


def _existing_parent(study: optuna.Study, settings: dict[str, Any]) -> str:
    """The parent run of a study made before; the study must search as asked now."""
    made_with = study.user_attrs.get(SETTINGS_ATTR)
    if made_with != settings:
        changed = sorted(
            f"{part}.{key}"
            for part in ("space", "options")
            for key in {*made_with.get(part, {}), *settings[part]}
            if made_with.get(part, {}).get(key) != settings[part].get(key)
        ) if made_with else ["everything"]  # fmt: skip
        raise SweepError(
            f"study {study.study_name} was made with other settings ({', '.join(changed)}); "
            "run it as it was made, or give a new --study"
        )
    # Machines that start together: the one that made the study makes the parent run.
    for _ in range(120):
        parent = study.user_attrs.get(PARENT_ATTR)
        if parent is not None:
            return str(parent)
        time.sleep(0.5)
        study = optuna.load_study(study_name=study.study_name, storage=study._storage)
    raise SweepError(f"study {study.study_name} has no parent run; give a new --study")
