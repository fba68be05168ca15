"""The parent run's view of a sweep: its settings and description when the study is made;
after each trial the best so far (a metric with step = trial number, tags naming the trial)
and the table of trials; Optuna's plots when asked (workers.py says when). And the tags that
nest each trial's run under it."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import optuna
from optuna.trial import FrozenTrial

from ..config import SweepConfig
from ..search_space import Space
from ..tracking.keys import PARENT_TAG as PARENT_TAG  # the children's, for callers

log = logging.getLogger(__name__)

# Tags of the child runs, besides the parent's (tracking.keys.PARENT_TAG).
STUDY_TAG = "sweep.study"
TRIAL_TAG = "sweep.trial"
STATE_TAG = "sweep.trial_state"  # running, complete, pruned, failed or interrupted
# The trial's user attribute that names its child run.
RUN_ATTR = "mlflow_run_id"
BEST_METRIC = "sweep/best_val_accuracy"


def log_settings(
    parent: str, sweep: SweepConfig, base: dict[str, Any], space: Space, storage: str
) -> None:
    """The sweep's settings as the parent's params (`storage` shown without its password),
    and a description of what it searches."""
    client = mlflow.MlflowClient()
    searched = {f"space.{name}": dimension.describe() for name, dimension in space.items()}
    # What every trial shares; `register` is the sweep's to do, and trials name their runs.
    fixed = {
        k: v
        for k, v in base.items()
        if k not in space and k not in ("register", "run_name") and v is not None
    }
    existing = client.get_run(parent).data.params  # `mlflow run` logged its own already
    params = {**dataclasses.asdict(sweep), "storage": storage, **searched, **fixed}
    new = {k: str(v) for k, v in params.items() if v is not None and k not in existing}
    client.log_batch(parent, params=[mlflow.entities.Param(k, v) for k, v in new.items()])
    client.set_tag(parent, "mlflow.note.content", _description(sweep, base, space))


def _description(sweep: SweepConfig, base: dict[str, Any], space: Space) -> str:
    searched = "\n".join(f"- `{name}`: {d.describe()}" for name, d in space.items())
    return (
        f"### Sweep of `{base['model']}`, {base['epochs']} epochs a trial\n\n"
        f"{sweep.trials} trials, {sweep.sampler} sampler, {sweep.pruner} pruner, "
        f"{sweep.workers} worker(s) on this machine. Each trial is a child run; the best by "
        f"validation accuracy is tagged `best_run_id`.\n\nSearched:\n{searched}"
    )


def record(
    parent: str, study: optuna.Study, trials: list[FrozenTrial], best: FrozenTrial | None,
    step: int,
) -> None:  # fmt: skip
    """After trial `step`, the study as it stands: `trials` (those that count) and the `best`
    complete one."""
    client = mlflow.MlflowClient()
    if best is not None and best.value is not None:
        client.log_metric(parent, BEST_METRIC, best.value, step=step)
        tags = {"best_trial": str(best.number), "best_run_id": best.user_attrs[RUN_ATTR]}
        tags.update({f"best.{name}": str(value) for name, value in best.params.items()})
        for key, value in tags.items():
            client.set_tag(parent, key, value)
    numbers = {t.number for t in trials}
    table = study.trials_dataframe()
    _log_files(parent, lambda folder: table[table["number"].isin(numbers)].to_csv(
        folder / "trials.csv", index=False))  # fmt: skip


def draw(parent: str, study: optuna.Study, trials: list[FrozenTrial]) -> None:
    """Optuna's plots of the study's `trials` (those that count), over those drawn before."""
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    _log_files(parent, lambda folder: _plots(study, complete, folder / "plots"))


def _log_files(parent: str, write: Callable[[Path], Any]) -> None:
    """What `write` puts in a folder, logged to the parent run at the same paths."""
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        # File by file: workers record at the same moment, and MLflow's local store copies a
        # folder by checking, then making, each subfolder (the slower worker's make fails).
        for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            folder = path.parent.relative_to(tmp).as_posix()
            client.log_artifact(parent, str(path), None if folder == "." else folder)


def _plots(study: optuna.Study, complete: int, folder: Path) -> None:
    """Optuna's optimisation history, parameter importances and parallel coordinates, once
    there are enough finished trials to draw them."""
    from matplotlib import pyplot as plt
    from optuna.visualization import matplotlib as plots

    wanted: dict[str, tuple[Callable[[optuna.Study], Any], int]] = {
              "optimization_history": (plots.plot_optimization_history, 1),
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


def tag_state(run_id: str | None, state: str) -> None:
    """How the trial of child run `run_id` ended (or that it runs)."""
    if run_id is not None:
        mlflow.MlflowClient().set_tag(run_id, STATE_TAG, state)


def child_run(experiment_name: str, tags: dict[str, str]) -> str | None:
    """The child run tagged with all of `tags` (the parent's, and a trial's or a job's), if
    it got as far as starting. The values are run ids and numbers, never a name given."""
    wanted = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = mlflow.search_runs(
        experiment_names=[experiment_name], filter_string=wanted, output_format="list"
    )
    return runs[0].info.run_id if runs else None
