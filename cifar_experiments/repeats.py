"""Repeats: one setting trained with several seeds (seed, seed + 1, ...) as child runs of one
parent run, all on the same validation split. The parent sums them up over seeds, a mean with
its 95 % t-interval, so a setting is judged by more than one lucky draw; the best child goes
through the champion gate.

    plan(...)  -> the parent run (or the one `mlflow run` made), with the setting as params
    run(...)   -> the seeds trained (in processes sharing the cores, with several workers),
                  the summary on the parent, the best child registered
"""

from __future__ import annotations

import dataclasses
import functools
import statistics as stdlib_statistics
from dataclasses import dataclass

import mlflow
import torch
from matplotlib import pyplot as plt

from . import data, experiment, processes, registry
from . import statistics as paired_statistics
from .config import TrainConfig
from .evaluation import seeds_figure
from .interrupts import StopRequests
from .tracking import lifecycle, store
from .tracking.keys import BEST_VAL_METRIC, PARENT_TAG, TEST_ACCURACY_METRIC

SEED_TAG = "repeats.seed"


@dataclass(frozen=True)
class Plan:
    """What every worker needs, picklable for the processes it starts in."""

    config: TrainConfig  # the setting; each child takes its own seed
    repeats: int
    workers: int
    parent_run_id: str
    name: str
    tracking_uri: str
    threads: int

    @property
    def seeds(self) -> list[int]:
        return [self.config.seed + index for index in range(self.repeats)]


@dataclass(frozen=True)
class Outcome:
    parent_run_id: str
    name: str
    summary: dict[str, float]  # the parent's repeats/... metrics
    best_run_id: str
    best_seed: int
    registration: registry.Registration | None = None


def plan(config: TrainConfig, repeats: int, workers: int, project_run: str | None) -> Plan:
    """The parent run of the repeats: `mlflow run`'s, or a new one named after the setting."""
    name = config.run_name or f"{config.model}-{config.epochs}-epochs-{repeats}-seeds"
    parent = project_run or lifecycle.start_parent_run(config.experiment_name, name)
    client = mlflow.MlflowClient()
    client.update_run(parent, name=name)
    store.mark_as_training(client.get_run(parent).info.experiment_id)
    existing = client.get_run(parent).data.params  # `mlflow run` logged its own already
    params = {**config.as_params(), "repeats": repeats, "workers": workers}
    params.pop("seed")  # each child has its own; the first is the setting's
    params["seeds"] = f"{config.seed}..{config.seed + repeats - 1}"
    new = [mlflow.entities.Param(k, str(v)) for k, v in params.items() if k not in existing]
    client.log_batch(parent, params=new)
    threads = processes.threads_per_worker(workers)
    return Plan(config, repeats, workers, parent, name, store.tracking_uri(), threads)


def run(plan: Plan, stop: StopRequests, dataset: data.Dataset | None = None) -> Outcome:
    """Train every seed under the parent run, sum them up on it, then register the best child
    (by validation accuracy) through the gate if the setting registers. Raises Interrupted
    when stopped, processes.WorkerFailed when a worker fails, and registry.RegistrationFailed,
    carrying the outcome, when only the registration failed."""
    with lifecycle.holding(plan.parent_run_id):
        if plan.workers == 1:
            work(plan, 0, stop, dataset)
        else:
            processes.run(functools.partial(work, plan), plan.workers, stop)
        outcome = _summarize(plan)
    if not plan.config.register:
        return outcome
    config = plan.config
    registration = registry.register_finished(
        outcome, outcome.best_run_id, config.model_name, config.gate, config.gate_alpha
    )
    return dataclasses.replace(outcome, registration=registration)


def work(plan: Plan, worker: int, stop: StopRequests, dataset: data.Dataset | None = None) -> None:
    """One worker's share of the seeds, each as a child run, on the same validation split."""
    torch.set_num_threads(plan.threads)
    mlflow.set_tracking_uri(plan.tracking_uri)
    dataset = dataset or data.load_dataset(plan.config.data)  # decoded once per worker
    for seed in plan.seeds[worker :: plan.workers]:
        config = dataclasses.replace(
            plan.config, seed=seed, register=False, run_name=f"{plan.name}-seed-{seed}"
        )
        tags = {PARENT_TAG: plan.parent_run_id, SEED_TAG: str(seed)}
        prepared = experiment.prepare(config, dataset=dataset)
        experiment.train(prepared, stop, tags=tags, progress_bars=plan.workers == 1)


def _summarize(plan: Plan) -> Outcome:
    """The children's validation and test accuracy over seeds, as the parent's metrics (mean,
    standard deviation, 95 % t-interval), and their validation curves on one chart."""
    client = mlflow.MlflowClient()
    children = client.search_runs(
        [client.get_run(plan.parent_run_id).info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{plan.parent_run_id}' and "
        "attributes.status = 'FINISHED'",
    )
    summary: dict[str, float] = {}
    for name, metric in (
        ("val_accuracy", BEST_VAL_METRIC),
        ("test_accuracy", TEST_ACCURACY_METRIC),
    ):
        values = [run.data.metrics[metric] for run in children if metric in run.data.metrics]
        if not values:
            continue
        low, high = paired_statistics.t_interval(values)
        summary[f"repeats/{name}_mean"] = stdlib_statistics.fmean(values)
        summary[f"repeats/{name}_std"] = stdlib_statistics.stdev(values) if len(values) > 1 else 0.0
        summary[f"repeats/{name}_ci_low"], summary[f"repeats/{name}_ci_high"] = low, high
    for key, value in summary.items():
        client.log_metric(plan.parent_run_id, key, value)
    curves = {
        int(run.data.tags[SEED_TAG]): [
            (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/accuracy")
        ]
        for run in children
    }
    figure = seeds_figure(curves)
    client.log_figure(plan.parent_run_id, figure, "repeats/val_curves.png")
    plt.close(figure)
    # The best validation accuracy; the first seed of equals.
    best = max(
        children,
        key=lambda run: (
            run.data.metrics.get(BEST_VAL_METRIC, -1.0),
            -int(run.data.tags[SEED_TAG]),
        ),
    )
    return Outcome(plan.parent_run_id, plan.name, summary, best.info.run_id,
                   int(best.data.tags[SEED_TAG]))  # fmt: skip
