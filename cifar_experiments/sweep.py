"""Sweeps: one Optuna study searches training options, each trial a child MLflow run of one
parent run per study. Workers on one machine share its cores; machines share the study
through Optuna's storage and the tracking server. When it ends, the best trial is registered.

    plan(...)  -> the study and its parent run, made or found again (a study continues)
    work(...)  -> one worker: trials until the budget is spent, the time is up, or a stop
    run(...)   -> the workers of this machine, then the outcome
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import signal
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, ProgrammingError, SQLAlchemyError

from . import data, engine, experiment, search_space, tracking
from .config import ConfigError, SweepConfig, TrainConfig
from .interrupts import Interrupted, StopRequests

log = logging.getLogger(__name__)

# Tags of the child runs: the UI nests a run under the one its parentRunId names.
PARENT_TAG = "mlflow.parentRunId"
STUDY_TAG = "sweep.study"
TRIAL_TAG = "sweep.trial"
STATE_TAG = "sweep.trial_state"  # running, complete, pruned, failed or interrupted
# What the study keeps for every worker and machine to find.
PARENT_ATTR = "mlflow_parent_run_id"
SETTINGS_ATTR = "settings"
RUN_ATTR = "mlflow_run_id"
FAILURE_ATTR = "failure"
# A trial asked for after the budget was spent (workers raced for the last one): not run.
SURPLUS_ATTR = "surplus"
BEST_METRIC = "sweep/best_val_accuracy"
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
    best: FrozenTrial | None

    @property
    def best_run_id(self) -> str | None:
        return self.best.user_attrs.get(RUN_ATTR) if self.best is not None else None


def default_storage() -> str:
    """optuna.db beside a SQLite tracking store, or in this folder."""
    database = tracking.sqlite_file()
    folder = database.parent if database is not None else Path.cwd()
    return f"sqlite:///{folder / 'optuna.db'}"


def shown(storage: str) -> str:
    """A storage URL without its password, to log and print."""
    try:
        return make_url(storage).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL at all: at least leave out what precedes a host
        return storage.rpartition("@")[2]


def plan(sweep: SweepConfig, base: dict[str, Any], space: search_space.Space) -> Plan:
    """Find the study (or make it, with its parent run) and check that it searches as asked.

    Under `mlflow run`, a new study's parent is the run it made; a study that exists keeps
    its own parent, which `mlflow run --run-id` continues.
    """
    project_run = os.environ.pop(tracking.PROJECT_RUN_ENV, None)  # trials start runs of their own
    experiment_name = (
        tracking.experiment_of(project_run) if project_run else base["experiment_name"]
    )
    base = {**base, "experiment_name": experiment_name, "register": False}
    study_name = sweep.study or f"{experiment_name}-{base['model']}"
    if sweep.sampler == "grid":
        search_space.grid(space)  # a range without a grid is refused now, not in a worker
    storage = sweep.storage or default_storage()
    settings = _settings(base, space)
    try:
        study = optuna.create_study(study_name=study_name, storage=_storage(storage),
                                    direction="maximize")  # fmt: skip
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=_storage(storage))
        parent = _existing_parent(study, settings)
    else:
        study.set_user_attr(SETTINGS_ATTR, settings)
        parent = project_run or tracking.start_parent_run(experiment_name, study_name)
        mlflow.MlflowClient().set_tag(parent, STUDY_TAG, study_name)
        study.set_user_attr(PARENT_ATTR, parent)
        _log_settings(parent, sweep, base, space, storage)
        recipe = _recipe_point(base, space)
        if recipe and sweep.sampler != "grid":  # a grid's points are its own
            study.enqueue_trial(recipe)  # the first trial is the recipe: a sweep starts from it
    tracking.mark_as_training(mlflow.MlflowClient().get_run(parent).info.experiment_id)
    if project_run not in (None, parent):
        raise SweepError(
            f"study {study_name} already has its parent run {parent}, and `mlflow run` made a "
            f"new one ({project_run}); continue the study in its own run: mlflow run . -e sweep "
            f"--run-id {parent} ... (the same parameters)"
        )
    threads = max(1, _cores() // sweep.workers)
    if sweep.workers > _cores():
        log.warning("%d workers on %d cores: each gets one thread, and they take turns",
                    sweep.workers, _cores())  # fmt: skip
    deadline = time.time() + sweep.timeout if sweep.timeout else None
    return Plan(sweep, base, space, study_name, storage, parent, tracking.tracking_uri(),
                deadline, threads)  # fmt: skip


def run(plan: Plan, stop: StopRequests) -> Outcome:
    """Run this machine's workers on the study to its end, under its parent run; raises
    Interrupted when stopped (the study continues when run again)."""
    with tracking.holding(plan.parent_run_id):
        if plan.sweep.workers == 1:
            work(plan, 0, stop)
        else:
            _run_processes(plan, stop)
        study = optuna.load_study(study_name=plan.study_name, storage=_storage(plan.storage))
        return _outcome(plan, study)


def work(plan: Plan, worker: int, stop: StopRequests) -> None:
    """One worker: trials until the study's budget is spent, the time is up, or a stop."""
    torch.set_num_threads(plan.threads)
    mlflow.set_tracking_uri(plan.tracking_uri)
    objective = Objective(plan, data.load_dataset(plan.base["data"]), stop)  # decoded once
    study = optuna.load_study(
        study_name=plan.study_name,
        storage=_storage(plan.storage),
        pruner=_pruner(plan.sweep.pruner, plan.base["epochs"]),
    )
    # Each worker draws its own random stream (one stream would propose the same first trials
    # in every worker), reproducible from the sweep's seed and the trials so far.
    study.sampler = _sampler(plan, seed=plan.base["seed"] * 1000 + 100 * worker + len(study.trials))
    while stop.pending is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # those of workers killed outright
        if _open_slots(study, plan.budget) <= 0:
            break
        if plan.deadline is not None and time.time() >= plan.deadline:
            log.info("The sweep's time is up: no new trial starts")
            break
        study.optimize(objective, n_trials=1, gc_after_trial=True,
                       callbacks=[lambda study, trial: _record(plan, study, trial)])  # fmt: skip
        if objective.interruption is not None:
            raise objective.interruption


class Pruning(engine.Callback):
    """Reports each epoch's validation accuracy to the trial, and ends training after an
    epoch the pruner finds hopeless (its own warm-up keeps it from judging early)."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.pruned_at: int | None = None

    def on_epoch_end(
        self, state: engine.TrainingState, epoch: int, metrics: dict[str, float]
    ) -> bool:
        self.trial.report(metrics["val/accuracy"], epoch)
        if epoch < state.config.epochs and self.trial.should_prune():
            self.pruned_at = epoch
        return self.pruned_at is not None


def warmup_epochs(epochs: int) -> int:
    """The epoch by whose end the one-cycle warm-up is over: no trial is judged before it."""
    return max(1, math.ceil(engine.WARMUP_FRACTION * epochs))


class Objective:
    """Trains one trial as a child run and answers its validation accuracy. A trial that
    cannot train answers NaN, which Optuna records as failed in one line (an exception
    would print its traceback); so does an interrupted one, whose stop is passed on."""

    def __init__(self, plan: Plan, dataset: data.Dataset, stop: StopRequests) -> None:
        self.plan, self.dataset, self.stop = plan, dataset, stop
        self.interruption: Interrupted | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        plan = self.plan
        if _taken_before(trial) >= plan.budget:  # another worker took the last trial
            trial.set_user_attr(SURPLUS_ATTR, True)
            return math.nan
        params = {name: dimension.suggest(name, trial) for name, dimension in plan.space.items()}
        run_name = f"{plan.study_name}-trial-{trial.number}"
        try:
            config = TrainConfig(**{**plan.base, **params, "run_name": run_name})
        except ConfigError as error:  # values that do not go together: Nesterov, no momentum
            return _failed(trial, str(error))
        prepared = experiment.prepare(config, dataset=self.dataset)
        tags = {PARENT_TAG: plan.parent_run_id, STUDY_TAG: plan.study_name,
                TRIAL_TAG: str(trial.number), STATE_TAG: "running"}  # fmt: skip
        pruning = Pruning(trial)
        try:
            summary = experiment.train(
                prepared, self.stop, [pruning], tags, progress_bars=plan.sweep.workers == 1
            )
        except Interrupted as interruption:
            _tag_state(interruption.run_id, "interrupted")
            self.interruption = interruption
            return math.nan
        except Exception as error:  # the trial fails; the sweep goes on
            _tag_state(_run_of(plan, trial.number), "failed")
            return _failed(trial, str(error) or type(error).__name__)
        trial.set_user_attr(RUN_ATTR, summary.run_id)
        if pruning.pruned_at is not None:
            _tag_state(summary.run_id, "pruned")
            raise optuna.TrialPruned(f"Stopped after epoch {pruning.pruned_at}.")
        _tag_state(summary.run_id, "complete")
        return summary.val_accuracy


def _failed(trial: optuna.Trial, reason: str) -> float:
    trial.set_user_attr(FAILURE_ATTR, reason)
    log.warning("Trial %d failed: %s", trial.number, reason)
    return math.nan


def _tag_state(run_id: str | None, state: str) -> None:
    if run_id is not None:
        mlflow.MlflowClient().set_tag(run_id, STATE_TAG, state)


def _run_of(plan: Plan, number: int) -> str | None:
    """The child run of trial `number`, if it got as far as starting one."""
    runs = mlflow.search_runs(
        experiment_names=[plan.base["experiment_name"]],
        filter_string=f"tags.`{PARENT_TAG}` = '{plan.parent_run_id}' "
        f"and tags.`{TRIAL_TAG}` = '{number}'",
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def _counts(trial: FrozenTrial) -> bool:
    """Whether a finished trial spends the budget: interrupted and surplus ones do not."""
    if trial.state == TrialState.FAIL:
        return FAILURE_ATTR in trial.user_attrs
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def _open_slots(study: optuna.Study, budget: int) -> int:
    trials = study.get_trials(deepcopy=False)
    return budget - sum(_counts(t) or t.state == TrialState.RUNNING for t in trials)


def _taken_before(trial: optuna.Trial) -> int:
    """Trials numbered before this one that spend the budget, or may (still running)."""
    earlier = trial.study.get_trials(deepcopy=False)
    return sum(
        t.number < trial.number and (_counts(t) or t.state == TrialState.RUNNING) for t in earlier
    )


def _record(plan: Plan, study: optuna.Study, finished: FrozenTrial) -> None:
    """After each trial, the parent run's view of the study: the best so far (a metric with
    step = trial number, tags naming the trial), the table of trials and Optuna's plots."""
    if finished.user_attrs.get(SURPLUS_ATTR):
        return
    client = mlflow.MlflowClient()
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = _best(complete)
    if best is not None:
        client.log_metric(plan.parent_run_id, BEST_METRIC, best.value, step=finished.number)
        tags = {"best_trial": str(best.number), "best_run_id": best.user_attrs[RUN_ATTR]}
        tags.update({f"best.{name}": str(value) for name, value in best.params.items()})
        for key, value in tags.items():
            client.set_tag(plan.parent_run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        numbers = {t.number for t in trials}
        table = study.trials_dataframe()
        table[table["number"].isin(numbers)].to_csv(Path(tmp) / "trials.csv", index=False)
        _plots(study, len(complete), Path(tmp) / "plots")
        # File by file: workers record at the same moment, and MLflow's local store copies a
        # folder by checking, then making, each subfolder (the slower worker's make fails).
        for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            folder = path.parent.relative_to(tmp).as_posix()
            client.log_artifact(plan.parent_run_id, str(path), None if folder == "." else folder)


def _plots(study: optuna.Study, complete: int, folder: Path) -> None:
    """Optuna's optimisation history, parameter importances and parallel coordinates, once
    there are enough finished trials to draw them."""
    from matplotlib import pyplot as plt
    from optuna.visualization import matplotlib as plots

    wanted = {"optimization_history": (plots.plot_optimization_history, 1),
              "parallel_coordinate": (plots.plot_parallel_coordinate, 1),
              "param_importances": (plots.plot_param_importances, 2)}  # fmt: skip
    folder.mkdir()
    for name, (plot, needs) in wanted.items():
        if complete < needs:
            continue
        with warnings.catch_warnings():
            # Optuna's plots are experimental and matplotlib warns of flat axes: neither is news.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as error:  # importances of a space that never varied
                log.info("No %s plot yet: %s", name, error)
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        figure.savefig(folder / f"{name}.png", dpi=100)
        plt.close(figure)


def _best(complete: list[FrozenTrial]) -> FrozenTrial | None:
    """The complete trial with the best validation accuracy; the earliest of equals."""
    return max(complete, key=lambda t: (t.value, -t.number), default=None)


def _outcome(plan: Plan, study: optuna.Study) -> Outcome:
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR)]
    states = Counter(
        "failed" if t.state == TrialState.FAIL and FAILURE_ATTR in t.user_attrs
        else "interrupted" if t.state == TrialState.FAIL
        else t.state.name.lower()
        for t in trials
    )  # fmt: skip
    best = _best([t for t in trials if t.state == TrialState.COMPLETE])
    return Outcome(plan.study_name, plan.parent_run_id, dict(states), best)


def _run_processes(plan: Plan, stop: StopRequests) -> None:
    """Start a process per worker and wait for them. A stop request reaches each as SIGTERM,
    which ends it after its current step, like Ctrl-C (a terminal sends that to all of them
    already; a SIGTERM after a SIGINT changes nothing)."""
    context = multiprocessing.get_context("spawn")  # no torch state forked mid-use
    failures = context.SimpleQueue()  # (process name, last words) of each worker that fails
    processes = [
        context.Process(
            target=_worker_process, args=(plan, worker, failures), name=f"worker-{worker}"
        )
        for worker in range(plan.sweep.workers)
    ]
    for process in processes:
        process.start()
    forwarded = False
    try:
        with stop.deferred():
            while any(process.is_alive() for process in processes):
                if stop.pending is not None and not forwarded:
                    for process in processes:
                        if process.is_alive():
                            os.kill(process.pid, signal.SIGTERM)
                    forwarded = True
                time.sleep(0.2)
    finally:
        for process in processes:
            if process.is_alive():  # a second Ctrl-C: stop at once
                process.terminate()
            process.join()
    if stop.pending is not None:
        raise Interrupted(stop.pending)
    crashed = [p for p in processes if p.exitcode not in (0, *_interrupted_codes())]
    if crashed:
        said = {}
        while not failures.empty():
            name, last_words = failures.get()
            said[name] = last_words
        reason = said.get(crashed[0].name, "its output says why")
        raise SweepError(f"{crashed[0].name} failed (exit status {crashed[0].exitcode}): {reason}")
    if any(p.exitcode for p in processes):
        raise Interrupted(signal.SIGTERM)  # someone stopped a worker itself


def _interrupted_codes() -> tuple[int, ...]:
    return tuple(Interrupted(signum).exit_code for signum in (signal.SIGINT, signal.SIGTERM))


def _worker_process(plan: Plan, worker: int, failures: multiprocessing.SimpleQueue) -> None:
    """A worker in a process of its own, its name on its lines (and no progress bars: those of
    several processes would overwrite each other). An error it did not expect ends it with its
    traceback, and its one line goes to the parent, which ends the sweep with it."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[worker {worker}] %(message)s"))
    package_log = logging.getLogger("cifar_experiments")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    with StopRequests().installed() as stop:
        try:
            work(plan, worker, stop)
        except Interrupted as interruption:
            raise SystemExit(interruption.exit_code) from None
        except Exception as error:
            name = multiprocessing.current_process().name
            failures.put((name, f"{type(error).__name__}: {_one_line(error)}"))
            raise


def _sampler(plan: Plan, seed: int) -> optuna.samplers.BaseSampler:
    if plan.sweep.sampler == "grid":
        return optuna.samplers.GridSampler(search_space.grid(plan.space), seed=seed)
    if plan.sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    warmup = warmup_epochs(epochs)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=warmup)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=warmup, max_resource=epochs)
    return optuna.pruners.NopPruner()


def _storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage at `url`; SweepError, in one line without the password, if unusable."""
    try:
        for pause in (1, 2, 3, 4):
            try:
                return _rdb_storage(url)
            except (IntegrityError, ProgrammingError):
                # Machines that start together on an empty database all create Optuna's
                # tables; all but one find them made meanwhile, and look again.
                time.sleep(pause)
        return _rdb_storage(url)
    except (ImportError, ValueError, SQLAlchemyError) as error:  # no driver, a bad URL
        raise SweepError(
            f"cannot use the Optuna storage {shown(url)}: {_one_line(error)}"
        ) from None


def _rdb_storage(url: str) -> optuna.storages.RDBStorage:
    # SQLite takes one writer at a time: workers wait their turn instead of failing at once.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # A trial whose worker was killed outright stops beating and is failed after the
        # grace period, so it neither holds a place in the budget nor counts in it.
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=30, grace_period=120
        )


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


def _settings(base: dict[str, Any], space: search_space.Space) -> dict[str, Any]:
    """What makes trials comparable: the space and every option that changes training."""
    options = {k: v for k, v in base.items() if k not in experiment.CHANGEABLE_ON_RESUME}
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
            return parent
        time.sleep(0.5)
        study = optuna.load_study(study_name=study.study_name, storage=study._storage)
    raise SweepError(f"study {study.study_name} has no parent run; give a new --study")


def _log_settings(
    parent: str, sweep: SweepConfig, base: dict[str, Any], space: search_space.Space, storage: str
) -> None:
    client = mlflow.MlflowClient()
    searched = {f"space.{name}": dimension.describe() for name, dimension in space.items()}
    # What every trial shares; `register` is the sweep's to do, and trials name their runs.
    fixed = {
        k: v
        for k, v in base.items()
        if k not in space and k not in ("register", "run_name") and v is not None
    }
    existing = client.get_run(parent).data.params  # `mlflow run` logged its own already
    params = {**dataclasses.asdict(sweep), "storage": shown(storage), **searched, **fixed}
    new = {k: str(v) for k, v in params.items() if v is not None and k not in existing}
    client.log_batch(parent, params=[mlflow.entities.Param(k, v) for k, v in new.items()])
    client.set_tag(parent, "mlflow.note.content", _description(sweep, base, space))


def _description(sweep: SweepConfig, base: dict[str, Any], space: search_space.Space) -> str:
    searched = "\n".join(f"- `{name}`: {d.describe()}" for name, d in space.items())
    return (
        f"### Sweep of `{base['model']}`, {base['epochs']} epochs a trial\n\n"
        f"{sweep.trials} trials, {sweep.sampler} sampler, {sweep.pruner} pruner, "
        f"{sweep.workers} worker(s) on this machine. Each trial is a child run; the best by "
        f"validation accuracy is tagged `best_run_id`.\n\nSearched:\n{searched}"
    )


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
