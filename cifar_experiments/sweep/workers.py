"""Workers: each takes trials from the study until its budget is spent, the time is up or a
stop is asked for, and trains each as a child run. This machine's workers run in processes of
their own, sharing its cores; the best trial is registered once the study ends.

    run(...)   -> this machine's workers on the study, then the outcome (and the best registered)
    work(...)  -> one worker's loop over trials
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
import warnings

import mlflow
import optuna
import torch

from .. import data, engine, experiment, processes, registry
from ..config import ConfigError, TrainConfig
from ..interrupts import Interrupted, StopRequests
from ..tracking import lifecycle
from . import parent_run, study
from .study import FAILURE_ATTR, SURPLUS_ATTR, Outcome, Plan, SweepError

log = logging.getLogger(__name__)


def run(plan: Plan, stop: StopRequests) -> Outcome:
    """Run this machine's workers on the study to its end, under its parent run, then register
    the best trial if the plan says so. Raises Interrupted when stopped (the study continues
    when run again), and registry.RegistrationFailed, carrying the outcome, when only the
    registration failed."""
    with lifecycle.holding(plan.parent_run_id):
        if plan.sweep.workers == 1:
            work(plan, 0, stop)
        else:
            try:
                processes.run(functools.partial(work, plan), plan.sweep.workers, stop)
            except processes.WorkerFailed as failure:
                raise SweepError(str(failure)) from None
        outcome = study.outcome(plan)
    if plan.register_as is None or outcome.best_run_id is None:
        return outcome
    gate, alpha = plan.base["gate"], plan.base["gate_alpha"]
    registration = registry.register_finished(
        outcome, outcome.best_run_id, plan.register_as, gate, alpha
    )
    return dataclasses.replace(outcome, registration=registration)


def work(plan: Plan, worker: int, stop: StopRequests) -> None:
    """One worker: trials until the study's budget is spent, the time is up, or a stop."""
    torch.set_num_threads(plan.threads)
    mlflow.set_tracking_uri(plan.tracking_uri)
    objective = Objective(plan, data.load_dataset(plan.base["data"]), stop)  # decoded once
    optuna_study = optuna.load_study(
        study_name=plan.study_name,
        storage=study.rdb_storage(plan.storage),
        pruner=study.pruner(plan.sweep.pruner, plan.base["epochs"]),
    )
    # Each worker draws its own random stream (one stream would propose the same first trials
    # in every worker), reproducible from the sweep's seed and the trials so far.
    seed = plan.base["seed"] * 1000 + 100 * worker + len(optuna_study.trials)
    optuna_study.sampler = study.sampler(plan, seed)
    while stop.pending is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(optuna_study)  # those of workers killed outright
        if study.open_slots(optuna_study, plan.budget) <= 0:
            break
        if plan.deadline is not None and time.time() >= plan.deadline:
            log.info("The sweep's time is up: no new trial starts")
            break
        optuna_study.optimize(objective, n_trials=1, gc_after_trial=True,
                              callbacks=[lambda s, trial: _record(plan, s, trial)])  # fmt: skip
        if objective.interruption is not None:
            raise objective.interruption


def _record(plan: Plan, optuna_study: optuna.Study, finished: optuna.trial.FrozenTrial) -> None:
    if finished.user_attrs.get(SURPLUS_ATTR):
        return
    trials = study.trials_run(optuna_study)
    parent_run.record(
        plan.parent_run_id, optuna_study, trials, study.best(trials), step=finished.number
    )


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


class Objective:
    """Trains one trial as a child run and answers its validation accuracy. A trial that
    cannot train answers NaN, which Optuna records as failed in one line (an exception
    would print its traceback); so does an interrupted one, whose stop is passed on."""

    def __init__(self, plan: Plan, dataset: data.Dataset, stop: StopRequests) -> None:
        self.plan, self.dataset, self.stop = plan, dataset, stop
        self.interruption: Interrupted | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        plan = self.plan
        if study.taken_before(trial) >= plan.budget:  # another worker took the last trial
            trial.set_user_attr(SURPLUS_ATTR, True)
            return math.nan
        params = {name: dimension.suggest(name, trial) for name, dimension in plan.space.items()}
        run_name = f"{plan.study_name}-trial-{trial.number}"
        try:
            config = TrainConfig(**{**plan.base, **params, "run_name": run_name})
        except ConfigError as error:  # values that do not go together: Nesterov, no momentum
            return _failed(trial, str(error))
        prepared = experiment.prepare(config, dataset=self.dataset)
        tags = {parent_run.PARENT_TAG: plan.parent_run_id, parent_run.STUDY_TAG: plan.study_name,
                parent_run.TRIAL_TAG: str(trial.number),
                parent_run.STATE_TAG: "running"}  # fmt: skip
        pruning = Pruning(trial)
        try:
            summary = experiment.train(
                prepared, self.stop, [pruning], tags, progress_bars=plan.sweep.workers == 1
            )
        except Interrupted as interruption:
            parent_run.tag_state(interruption.run_id, "interrupted")
            self.interruption = interruption
            return math.nan
        except Exception as error:  # the trial fails; the sweep goes on
            run_id = parent_run.run_of_trial(
                plan.base["experiment_name"], plan.parent_run_id, trial.number
            )
            parent_run.tag_state(run_id, "failed")
            return _failed(trial, str(error) or type(error).__name__)
        trial.set_user_attr(parent_run.RUN_ATTR, summary.run_id)
        if pruning.pruned_at is not None:
            parent_run.tag_state(summary.run_id, "pruned")
            raise optuna.TrialPruned(f"Stopped after epoch {pruning.pruned_at}.")
        parent_run.tag_state(summary.run_id, "complete")
        return summary.val_accuracy


def _failed(trial: optuna.Trial, reason: str) -> float:
    trial.set_user_attr(FAILURE_ATTR, reason)
    log.warning("Trial %d failed: %s", trial.number, reason)
    return math.nan
