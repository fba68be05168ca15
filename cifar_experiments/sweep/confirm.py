"""Confirming a sweep's winner. The best trial of many is flattered by luck: the search keeps
the trial whose seed happened to suit it. So the settings of the `--confirm-top` best trials
are trained again with `--confirm-seeds` new seeds each; the winner is the best on the mean
over those new seeds, and is tested against the runner-up image by image on the validation
split they all share (statistics.OverSeeds: a two-sided exact sign test).

The trainings are the trials of a second Optuna study beside the search's, `<study>:confirm`
in the same storage: its queue hands each (trial, seed) to one worker on one machine, and one
that a stop interrupted is queued again when the command runs again.

    queue(plan)    -> the confirmation's jobs queued, once the search has ended on every machine
    load(plan)     -> its study, for a worker
    setting(...)   -> what a job trains: its trial's values with a new seed
    decide(plan)   -> the verdict, once every job has ended, recorded on the parent run
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import statistics
from ..predictions import Predictions, shared_images
from ..tracking.past_runs import saved_predictions
from . import parent_run, study
from .study import FAILURE_ATTR, Plan

log = logging.getLogger(__name__)

# Tags of a confirmation's child runs: the search trial whose setting it trains, and the seed.
CONFIRM_TAG = "sweep.confirm"
SEED_TAG = "sweep.seed"
# A confirmation trial's job, as user attributes set when it is queued.
TRIAL_ATTR, SEED_ATTR = "confirms", "seed"
QUEUED_ATTR = "queued"  # set once the study that made the queue has filled it
POLL_SECONDS = 5


@dataclass(frozen=True)
class Job:
    trial: int  # the search trial whose setting is trained again
    seed: int


@dataclass(frozen=True)
class Standing:
    """One confirmed setting: its search trial and what its new seeds scored."""

    trial: int
    run_ids: tuple[str, ...]  # one per new seed
    accuracies: tuple[float, ...]  # each seed's, on the shared validation images

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))


@dataclass(frozen=True)
class Verdict:
    standings: tuple[Standing, ...]  # best mean first
    p_values: tuple[float, ...]  # the winner against each other standing, Holm-corrected
    images: int  # validation images every run shares
    alpha: float
    best_run_id: str  # the winner's best run (its search run or a new seed's), to register

    @property
    def winner(self) -> Standing:
        return self.standings[0]

    @property
    def tied(self) -> tuple[int, ...]:
        """The trials that cannot be told from the winner, the winner first; just the winner
        when it is significantly better than every other."""
        others = zip(self.standings[1:], self.p_values, strict=True)
        return (self.winner.trial, *(s.trial for s, p in others if p >= self.alpha))

    def tags(self) -> dict[str, str]:
        tags = {
            "sweep.verdict": "winner" if len(self.tied) == 1 else "tie",
            "sweep.p_value": f"{self.p_values[0]:.3g}",
            "sweep.winner": str(self.winner.trial),
            "sweep.winner_run_id": self.best_run_id,
            "sweep.confirmed_images": str(self.images),
        }
        if len(self.tied) > 1:
            tags["sweep.tie"] = ",".join(map(str, self.tied))
        return tags

    def as_json(self) -> dict[str, Any]:
        return {
            "verdict": self.tags(),
            "standings": [
                {"trial": s.trial, "mean_val_accuracy": s.mean, "runs": list(s.run_ids),
                 "val_accuracy": list(s.accuracies),
                 "p_value_vs_winner": None if i == 0 else self.p_values[i - 1]}
                for i, s in enumerate(self.standings)
            ],
        }  # fmt: skip


def study_name(plan: Plan) -> str:
    return f"{plan.study_name}:confirm"


def load(plan: Plan) -> optuna.Study:
    return optuna.load_study(study_name=study_name(plan), storage=study.rdb_storage(plan.storage))


def queue(plan: Plan) -> bool:
    """Queue the trainings that confirm the best trials, once no machine runs a search trial
    any more (those of stopped machines are failed after Optuna's grace period). Jobs queued
    before and still queued, running or done are not queued again. False when fewer than two
    trials completed: there is nothing to confirm."""
    top = _top(plan, _ended(study.search(plan)))
    if len(top) < 2:
        log.warning("%d trial(s) completed: nothing to confirm", len(top))
        return False
    storage = study.rdb_storage(plan.storage)
    try:
        confirmation = optuna.create_study(
            study_name=study_name(plan), storage=storage, direction="maximize"
        )
    except optuna.exceptions.DuplicatedStudyError:  # another machine made it, or a run before
        confirmation = optuna.load_study(study_name=study_name(plan), storage=storage)
        while not confirmation.user_attrs.get(QUEUED_ATTR):
            time.sleep(1)  # the machine that made it is filling its queue
            confirmation = optuna.load_study(study_name=study_name(plan), storage=storage)
    # Two machines continuing a stopped confirmation at the same moment may both queue its
    # missing jobs; decide() counts each (trial, seed) once.
    for job in _jobs(plan, top) - _jobs_taken(confirmation):
        confirmation.enqueue_trial({}, user_attrs={TRIAL_ATTR: job.trial, SEED_ATTR: job.seed})
    confirmation.set_user_attr(QUEUED_ATTR, True)
    return True


def job_of(trial: optuna.Trial | FrozenTrial) -> Job | None:
    """The job a confirmation trial was queued with; None for one that found the queue empty
    (another worker took the last job meanwhile)."""
    attrs = trial.user_attrs
    return Job(attrs[TRIAL_ATTR], attrs[SEED_ATTR]) if TRIAL_ATTR in attrs else None


def setting(plan: Plan, job: Job) -> dict[str, Any]:
    """The searched values of the job's trial, with the job's seed."""
    (trial,) = [t for t in study.search(plan).get_trials(deepcopy=False) if t.number == job.trial]
    return {**trial.params, "seed": job.seed}


def decide(plan: Plan) -> Verdict | None:
    """Once every job has ended (on every machine), judge the confirmed settings and record
    the verdict on the parent run, as tags and confirmation.json."""
    top = _top(plan, study.search(plan))
    confirmed = _confirmed_runs(plan, top)
    searched = {t.number: t.user_attrs[parent_run.RUN_ATTR] for t in top}
    runs = [run for ids in confirmed.values() for run in ids] + list(searched.values())
    verdict = judge(confirmed, searched, _validation_answers(runs), plan.base["gate_alpha"])
    if verdict is None:
        log.warning("Too few confirmation runs with saved predictions to judge the winner by")
        return None
    _record(plan.parent_run_id, verdict)
    return verdict


def judge(
    confirmed: dict[int, list[str]], searched: dict[int, str],
    answers: dict[str, Predictions], alpha: float,
) -> Verdict | None:  # fmt: skip
    """The winner on the mean over each trial's new seeds (`confirmed` runs), tested against
    every other trial on the validation images all the runs with `answers` share, Holm-corrected;
    its best run among those and its `searched` one. None when fewer than two trials have
    answers to judge by."""
    shared = shared_images(*answers.values()) if answers else np.array([], dtype=np.int64)
    if not len(shared):
        return None
    right = {run: answer.on(shared).right for run, answer in answers.items()}
    standings = sorted(
        (Standing(trial, tuple(r for r in ids if r in right),
                  tuple(float(right[r].mean()) for r in ids if r in right))
         for trial, ids in confirmed.items() if any(r in right for r in ids)),
        key=lambda s: (-s.mean, s.trial),
    )  # fmt: skip
    if len(standings) < 2:
        return None
    winner = standings[0]

    def seeds(standing: Standing) -> np.ndarray:
        return np.stack([right[r] for r in standing.run_ids])

    raw = [statistics.OverSeeds(seeds(winner), seeds(s)).p_value() for s in standings[1:]]
    candidates = [r for r in (*winner.run_ids, searched.get(winner.trial)) if r in right]
    best_run = max(candidates, key=lambda r: float(right[r].mean()))  # the first of equals
    return Verdict(tuple(standings), tuple(statistics.holm(raw)), len(shared), alpha, best_run)


def _confirmed_runs(plan: Plan, top: list[FrozenTrial]) -> dict[int, list[str]]:
    """Each top trial's finished confirmation runs, by seed; each job's first run only."""
    runs: dict[Job, str] = {}
    finished = _ended(load(plan)).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for trial in sorted(finished, key=lambda t: t.number):
        job = job_of(trial)
        if job is not None:
            runs.setdefault(job, trial.user_attrs[parent_run.RUN_ATTR])
    return {
        t.number: [runs[j] for j in sorted(_jobs(plan, [t]), key=lambda j: j.seed) if j in runs]
        for t in top
    }


def _ended(optuna_study: optuna.Study) -> optuna.Study:
    """`optuna_study` once none of its trials runs on any machine."""
    waited = False
    while True:
        study.fail_stale(optuna_study)
        running = optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return optuna_study
        if not waited:
            log.info("Waiting for %d trial(s) of %s on other machines", len(running),
                     optuna_study.study_name)  # fmt: skip
            waited = True
        time.sleep(POLL_SECONDS)


def _top(plan: Plan, search: optuna.Study) -> list[FrozenTrial]:
    """The `--confirm-top` complete trials with the best validation accuracy."""
    return study.ranked(study.trials_run(search))[: plan.sweep.confirm_top]


def _jobs(plan: Plan, trials: list[FrozenTrial]) -> set[Job]:
    """Each trial's setting with `--confirm-seeds` seeds it has not trained with."""
    return {
        Job(t.number, t.params.get("seed", plan.base["seed"]) + offset)
        for t in trials
        for offset in range(1, plan.sweep.confirm_seeds + 1)
    }


def _jobs_taken(confirmation: optuna.Study) -> set[Job]:
    """Jobs queued, under way or done, and those whose training failed (it would again); an
    interrupted one is not taken, so it is queued again."""
    taken = set()
    for trial in confirmation.get_trials(deepcopy=False):
        job = job_of(trial)
        if job is not None and (trial.state != TrialState.FAIL or FAILURE_ATTR in trial.user_attrs):
            taken.add(job)
    return taken


def _validation_answers(run_ids: list[str]) -> dict[str, Predictions]:
    answers = {}
    for run_id in run_ids:
        predictions = saved_predictions(run_id, "val")
        if predictions is None:
            log.warning("Run %s saved no validation predictions: it is left out", run_id)
        else:
            answers[run_id] = predictions
    return answers


def _record(parent: str, verdict: Verdict) -> None:
    client = mlflow.MlflowClient()
    for key, value in verdict.tags().items():
        client.set_tag(parent, key, value)
    client.log_metric(parent, "sweep/confirmed_val_accuracy", verdict.winner.mean)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "confirmation.json"
        path.write_text(json.dumps(verdict.as_json(), indent=2))
        client.log_artifact(parent, str(path))
