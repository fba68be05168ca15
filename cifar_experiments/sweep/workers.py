"""Workers: each takes trials from the study until its budget is spent, the time is up or a
stop is asked for, and trains each as a child run. This machine's workers run in processes of
their own, sharing its cores. Once the search has ended, they train the confirmation's jobs
(confirm.py) the same way; then the winner is registered.

    run(...)      -> the search, its confirmation, the outcome (and the winner registered)
    work(...)     -> one worker's loop over search trials
    confirming(...) -> one worker's loop over confirmation jobs
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import mlflow
import optuna
import torch

from .. import data, engine, experiment, processes, registry
from ..config import ConfigError, TrainConfig
from ..interrupts import Interrupted, StopRequests
from ..tracking import lifecycle
from . import confirm, parent_run, study
from .study import FAILURE_ATTR, SURPLUS_ATTR, Outcome, Plan, SweepError

log = logging.getLogger(__name__)

# Optuna's plots are redrawn as trials end at most this often (1 to 2 s of CPU each time).
PLOTS_EVERY_SECONDS = 60.0

Work = Callable[[Plan, int, StopRequests], None]


def run(plan: Plan, stop: StopRequests) -> Outcome:
    """Run this machine's workers on the study to its end, under its parent run, then confirm
    the best trials and register the winner if the plan says so. Raises Interrupted when
    stopped (the study and its confirmation continue when run again), and
    registry.RegistrationFailed, carrying the outcome, when only the registration failed."""
    with lifecycle.holding(plan.parent_run_id):
        _on_workers(work, plan, stop)
        outcome = study.outcome(plan)
        _draw(plan)
        if plan.sweep.confirm_top and confirm.queue(plan):
            _on_workers(confirming, plan, stop)
            outcome = dataclasses.replace(outcome, verdict=confirm.decide(plan))
    if plan.register_as is None or outcome.chosen_run_id is None:
        return outcome
    gate, alpha = plan.base["gate"], plan.base["gate_alpha"]
    registration = registry.register_finished(
        outcome, outcome.chosen_run_id, plan.register_as, gate, alpha
    )
    return dataclasses.replace(outcome, registration=registration)


def _on_workers(work: Work, plan: Plan, stop: StopRequests) -> None:
    if plan.sweep.workers == 1:
        work(plan, 0, stop)
        return
    try:
        processes.run(functools.partial(work, plan), plan.sweep.workers, stop)
    except processes.WorkerFailed as failure:
        raise SweepError(str(failure)) from None


def work(plan: Plan, worker: int, stop: StopRequests) -> None:
    """One worker: trials until the study's budget is spent, the time is up, or a stop."""
    objective = Objective(plan, _started(plan), stop)
    optuna_study = optuna.load_study(
        study_name=plan.study_name,
        storage=study.rdb_storage(plan.storage),
        pruner=study.pruner(plan.sweep.pruner, plan.base["epochs"]),
    )
    # Each worker draws its own random stream (one stream would propose the same first trials
    # in every worker), reproducible from the sweep's seed and the trials so far.
    seed = plan.base["seed"] * 1000 + 100 * worker + len(optuna_study.trials)
    optuna_study.sampler = study.sampler(plan, seed)

    def more() -> bool:
        if study.open_slots(optuna_study, plan.budget) <= 0:
            return False
        if plan.deadline is not None and time.time() >= plan.deadline:
            log.info("The sweep's time is up: no new trial starts")
            return False
        return True

    _trials(optuna_study, objective, stop, more, _Reporter(plan))


def confirming(plan: Plan, worker: int, stop: StopRequests) -> None:
    """One worker: confirmation jobs until none is left in the queue, or a stop."""
    confirmation = confirm.load(plan)

    def more() -> bool:
        return bool(confirmation.get_trials(deepcopy=False,
                                            states=(optuna.trial.TrialState.WAITING,)))  # fmt: skip

    _trials(confirmation, Confirmation(plan, _started(plan), stop), stop, more)


def _started(plan: Plan) -> data.Dataset:
    """A worker's share of the cores and the tracking server, and the data, decoded once."""
    torch.set_num_threads(plan.threads)
    mlflow.set_tracking_uri(plan.tracking_uri)
    return data.load_dataset(plan.base["data"])


def _trials(
    optuna_study: optuna.Study, objective: Objective, stop: StopRequests,
    more: Callable[[], bool], *callbacks: Callable[[optuna.Study, optuna.trial.FrozenTrial], None],
) -> None:  # fmt: skip
    """One trial at a time while `more()` says so and no stop is asked for."""
    while stop.pending is None:
        study.fail_stale(optuna_study)
        if not more():
            break
        optuna_study.optimize(objective, n_trials=1, callbacks=list(callbacks))
        if objective.interruption is not None:
            raise objective.interruption


class _Reporter:
    """Brings the parent run up to date as each of a worker's trials ends: the best so far and
    the table every time; Optuna's plots at most every PLOTS_EVERY_SECONDS, as drawing them
    takes longer than a tiny trial (the search's end draws them once more, `_draw`)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.drawn_at = time.monotonic()

    def __call__(self, optuna_study: optuna.Study, finished: optuna.trial.FrozenTrial) -> None:
        if finished.user_attrs.get(SURPLUS_ATTR):
            return
        trials = study.trials_run(optuna_study)
        parent = self.plan.parent_run_id
        parent_run.record(parent, optuna_study, trials, study.best(trials), step=finished.number)
        if time.monotonic() - self.drawn_at >= PLOTS_EVERY_SECONDS:
            parent_run.draw(parent, optuna_study, trials)
            self.drawn_at = time.monotonic()


def _draw(plan: Plan) -> None:
    """Optuna's plots of the whole search, on the parent run."""
    optuna_study = study.search(plan)
    parent_run.draw(plan.parent_run_id, optuna_study, study.trials_run(optuna_study))


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
        pruning = Pruning(trial)
        summary = self._train(trial, params, f"{plan.study_name}-trial-{trial.number}",
                              {parent_run.TRIAL_TAG: str(trial.number)}, [pruning])  # fmt: skip
        if summary is None:
            return math.nan
        if pruning.pruned_at is not None:
            parent_run.tag_state(summary.run_id, "pruned")
            raise optuna.TrialPruned(f"Stopped after epoch {pruning.pruned_at}.")
        parent_run.tag_state(summary.run_id, "complete")
        return summary.val_accuracy

    def _train(
        self, trial: optuna.Trial, values: dict[str, Any], run_name: str, tags: dict[str, str],
        callbacks: list[engine.Callback],
    ) -> experiment.Summary | None:  # fmt: skip
        """The base options with `values`, trained as a child run tagged `tags` (and the
        parent's, study's and state's); None when it failed or was stopped."""
        plan = self.plan
        try:
            config = TrainConfig(**{**plan.base, **values, "run_name": run_name})
        except ConfigError as error:  # values that do not go together: Nesterov, no momentum
            _failed(trial, str(error))
            return None
        prepared = experiment.prepare(config, dataset=self.dataset)
        tags = {parent_run.PARENT_TAG: plan.parent_run_id, **tags}  # that find the child run
        every_tag = {**tags, parent_run.STUDY_TAG: plan.study_name,
                     parent_run.STATE_TAG: "running"}  # fmt: skip
        try:
            summary = experiment.train(prepared, self.stop, callbacks, every_tag,
                                       progress_bars=plan.sweep.workers == 1)  # fmt: skip
        except Interrupted as interruption:
            parent_run.tag_state(interruption.run_id, "interrupted")
            self.interruption = interruption
            return None
        except Exception as error:  # the trial fails; the sweep goes on
            run_id = parent_run.child_run(plan.base["experiment_name"], tags)
            parent_run.tag_state(run_id, "failed")
            _failed(trial, str(error) or type(error).__name__)
            return None
        trial.set_user_attr(parent_run.RUN_ATTR, summary.run_id)
        return summary


class Confirmation(Objective):
    """Trains one confirmation job: a search trial's setting with a new seed."""

    def __call__(self, trial: optuna.Trial) -> float:
        job = confirm.job_of(trial)
        if job is None:  # another worker took the last job
            trial.set_user_attr(SURPLUS_ATTR, True)
            return math.nan
        name = f"{self.plan.study_name}-trial-{job.trial}-seed-{job.seed}"
        tags = {confirm.CONFIRM_TAG: str(job.trial), confirm.SEED_TAG: str(job.seed)}
        summary = self._train(trial, confirm.setting(self.plan, job), name, tags, [])
        if summary is None:
            return math.nan
        parent_run.tag_state(summary.run_id, "complete")
        return summary.val_accuracy


def _failed(trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr(FAILURE_ATTR, reason)
    log.warning("Trial %d of %s failed: %s", trial.number, trial.study.study_name, reason)
