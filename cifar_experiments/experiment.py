"""One training run, end to end: data and model in, a tracked run and its model out."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from . import checkpoint, data, engine, models, registry, serving, speedups
from .callbacks import Checkpointing, EpochModel, ProgressBar, StopOnDivergence, Tracker
from .config import TrainConfig, field_default, flag, may_change_on_resume
from .distributed import Handoff, World
from .evaluation import Evaluation, curves_figure
from .interrupts import Interrupted, StopRequests
from .predictions import Predictions
from .tracking import lifecycle, past_runs, store
from .tracking.keys import BEST_VAL_METRIC, LAUNCH_TAG, TEST_PREFIX

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A run cannot be resumed as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Resumption:
    """A run to continue, and the training state it continues from."""

    run_id: str
    state: dict[str, Any]


@dataclass(frozen=True)
class Prepared:
    """Everything checked and loaded before a run starts, so bad input never makes a run."""

    config: TrainConfig
    dataset: data.Dataset
    train: data.ImageSet
    val: data.ImageSet
    runtime: engine.Runtime
    val_ids: np.ndarray  # which of the data's training images `val` holds
    resumption: Resumption | None = None


@dataclass(frozen=True)
class Summary:
    run_id: str | None
    kept_epoch: int
    val_accuracy: float
    test_accuracy: float | None
    registration: registry.Registration | None = None


def prepare(
    config: TrainConfig, resumption: Resumption | None = None, dataset: data.Dataset | None = None,
    world: World | None = None,
) -> Prepared:  # fmt: skip
    """Check the store, this login's permission to add runs to the experiment, the checkpoint
    folder, the device and the processes of `world` the batch is shared by, then load (unless
    `dataset` is config.data, loaded already) and split the data.

    Raises TrackingError, CheckpointError, DeviceUnavailable, WorldError, DataError or
    ResumeError, each before a run exists.
    """
    (world or World()).check_batch(config.batch_size)
    store.check_store()
    experiment_name = (
        store.experiment_of(resumption.run_id) if resumption else config.experiment_name
    )
    store.check_can_train_in(experiment_name)
    checkpoint.check_writable(Path(config.checkpoint_dir))
    runtime = engine.Runtime.resolve(config.device, config.precision)
    if dataset is None:
        dataset = data.load_dataset(config.data)
    if resumption is not None:
        trained_on = resumption.state["meta"]["data_digest"]
        if dataset.digest != trained_on:
            raise ResumeError(
                f"the data in {dataset.source} (digest {dataset.digest}) is not the data run "
                f"{resumption.run_id} was trained on (digest {trained_on})"
            )
    val_ids, train, val = _split(config, dataset)
    return Prepared(config, dataset, train, val, runtime, val_ids, resumption)


def _split(
    config: TrainConfig, dataset: data.Dataset
) -> tuple[np.ndarray, data.ImageSet, data.ImageSet]:
    """Which images are held out for validation, then the training and validation splits."""
    val_ids = data.held_out(dataset.train.labels.numpy(), config.val_fraction, config.split_seed)
    return val_ids, *data.split_at(dataset.train, val_ids)


def _check_own_checkpoint(run_id: str, path: Path, folder: Path) -> None:
    """The file a run's `checkpoint` tag names must be the run's own file in its checkpoint
    folder, not one elsewhere, nor a link out of it: a tag can be changed by anyone who may
    edit the run."""
    own = folder.resolve() / f"{run_id}.pt"
    if path.resolve() == own:
        return
    if path.parent.resolve() == own.parent:
        raise ResumeError(f"run {run_id}'s checkpoint {path} links out of its checkpoint folder "
                          f"(to {path.resolve()}); refused")  # fmt: skip
    raise ResumeError(
        f"run {run_id}'s checkpoint tag names {path}, which is not {own}, the run's file in its "
        f"checkpoint folder; refused. If that file is the run's, resume with --checkpoint-dir "
        f"{path.parent}"
    )


def plan_resume(run_id: str, options: dict[str, Any]) -> tuple[TrainConfig, Resumption] | None:
    """The configuration and saved state to continue `run_id` with, or None if it finished.

    Options left at their defaults take the run's values; any other must match the run's,
    except those that may change on resume (config.option).
    """
    try:
        past = past_runs.find_run(run_id)
    except store.TrackingError as error:
        raise ResumeError(str(error)) from None
    if past.status == "FINISHED":
        return None
    if past.status == "RUNNING" and _alive(past.process):
        raise ResumeError(f"run {run_id} is still RUNNING, in process {past.process}")
    given = options.get("checkpoint_dir")
    if given in (None, field_default("checkpoint_dir")):
        given = past.checkpoint_dir or field_default("checkpoint_dir")
    folder = Path(given)
    path = past.checkpoint
    if path is not None and path.is_file():
        _check_own_checkpoint(run_id, path, folder)
    else:
        path = past_runs.download_checkpoint(run_id, folder / f"{run_id}-downloaded")
    if path is None:
        raise ResumeError(
            f"run {run_id} has no checkpoint: it stopped before its first epoch ended, so "
            "there is nothing to resume; start a new run"
        )
    state = checkpoint.load(path)
    original = state["meta"]["config"]
    if "split_seed" not in original:
        raise ResumeError(
            f"run {run_id} was made before validation splits had a seed of their own "
            "(--split-seed), and its split cannot be drawn again; start a new run"
        )
    conflicts = [
        f"{flag(name)} {original[name]}"
        for name, value in options.items()
        if not may_change_on_resume(name)
        and value != field_default(name)
        and value != original[name]
    ]
    if conflicts:
        raise ResumeError(
            f"run {run_id} was trained with {', '.join(conflicts)}; a resumed run keeps its "
            "own options, so leave these out or give the run's values"
        )
    changes = {
        name: value
        for name, value in options.items()
        if may_change_on_resume(name) and value != field_default(name)
    }
    return TrainConfig(**{**original, **changes}), Resumption(run_id, state)


def _alive(process: str | None) -> bool:
    """Whether "host:pid" names a live process; one on another host is assumed alive."""
    if not process:
        return False
    host, _, pid = process.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def run(
    prepared: Prepared,
    tracker: Tracker,
    checkpoints: checkpoint.CheckpointFile | None = None,
    stop: StopRequests | None = None,
    callbacks: Sequence[engine.Callback] = (),
    progress_bars: bool = True,
    handoff: Handoff | None = None,
) -> Summary:
    """Train, evaluate and log the model, recording all of it through `tracker`.

    With `checkpoints`, the training state is saved after every epoch and, once `stop` has a
    signal pending, between two steps; training then raises Interrupted. `callbacks` plug into
    the loop after the tracker's, the progress bar's and the checkpoints' (a pruner does).
    Training that diverges raises TrainingDiverged. Under torchrun this is rank 0's part, and
    `handoff` hands the other ranks what they need to train with it (`follow`).
    """
    config, dataset, resumption = prepared.config, prepared.dataset, prepared.resumption
    world = World()
    if handoff is not None:
        world = handoff.world
        handoff.send({
            "run_id": tracker.run_id, "config": dataclasses.asdict(config),
            "data_digest": dataset.digest,
            "training": resumption.state["training"] if resumption is not None else None,
        })  # fmt: skip
    state = engine.TrainingState.create(
        config, prepared.train, dataset.classes, prepared.runtime, world
    )
    if resumption is None:
        tracker.log_params(_params(prepared, state))
        tracker.log_dataset(dataset)
        # The untrained network too: MLflow's image slider opens at step 0.
        tracker.log_confusion(state.evaluate(prepared.val, tta=False), epoch=0)
    else:
        state.load_state_dict(resumption.state["training"])
    progress = ProgressBar(progress_bars)
    # Each epoch's model before the tracker logs the epoch's metrics, which are linked to it.
    plugged: list[engine.Callback] = [EpochModels(prepared, tracker)] if config.keep_models else []
    plugged += [tracker, progress, StopOnDivergence()]
    if checkpoints is not None:
        plugged.append(Checkpointing(checkpoints, tracker, stop))
    deferred = stop.deferred() if stop is not None else contextlib.nullcontext()
    with deferred, progress:
        fit = engine.fit(state, prepared.val, [*plugged, *callbacks])
    assert fit is not None, "rank 0 always ends with the result"
    test = _record_results(prepared, state, fit, tracker)
    return Summary(
        run_id=tracker.run_id,
        kept_epoch=fit.kept_epoch,
        val_accuracy=fit.kept_val.accuracy,
        test_accuracy=test.accuracy if test is not None else None,
    )


def _record_results(
    prepared: Prepared, state: engine.TrainingState, fit: engine.FitResult, tracker: Tracker
) -> Evaluation | None:
    """Once training is over: the kept epoch's scores, the test split's (if any), the curves,
    the model and the run's description. Answers the test split's evaluation."""
    dataset = prepared.dataset
    tracker.log_metrics({BEST_VAL_METRIC: fit.kept_val.accuracy}, step=fit.kept_epoch)
    tracker.log_evaluation("val", fit.kept_val, prepared.val)
    tracker.log_predictions("val", Predictions.of(fit.kept_val, prepared.val_ids, dataset.digest))
    tracker.log_figure(curves_figure(fit.history), "training_curves.png")
    test = None
    if dataset.test is not None:
        test = state.evaluate(dataset.test)
        # What the network scores alone, as the tutorial's test loop would score it.
        single_view = state.evaluate(dataset.test, tta=False).accuracy
        tracker.log_metrics(
            {**{f"{TEST_PREFIX}{k}": v for k, v in test.metrics().items()},
             f"{TEST_PREFIX}accuracy_without_tta": single_view},
            step=fit.kept_epoch,
        )  # fmt: skip
        tracker.log_evaluation("test", test, dataset.test)
        test_ids = np.arange(len(dataset.test))
        tracker.log_predictions("test", Predictions.of(test, test_ids, dataset.digest))
    example_png = data.encode_png(prepared.val.images[0])
    tracker.log_model(*_servable(prepared, state), example_png=example_png)
    tracker.set_description(_description(prepared, fit, test))
    return test


def _servable(
    prepared: Prepared, state: engine.TrainingState
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's weights as served, and what serving needs besides them. The weights take
    images normalised as the tutorial's code does, whatever training used."""
    logged = data.TUTORIAL_NORMALIZATION
    weights = models.weights_for_inputs(
        state.model, (state.normalization.mean, state.normalization.std), (logged.mean, logged.std)
    )
    return weights, serving.settings(prepared.config.model, prepared.dataset.classes, logged)


class EpochModels(engine.Callback):
    """Each epoch's weights as a model of the run (an MLflow LoggedModel at step=epoch), with
    its validation predictions, for the gate; the tracker keeps the `keep_models` best."""

    def __init__(self, prepared: Prepared, tracker: Tracker) -> None:
        self.prepared, self.tracker = prepared, tracker

    def on_epoch_end(
        self, state: engine.TrainingState, epoch: int, metrics: dict[str, float]
    ) -> None:
        prepared, val = self.prepared, state.last_val
        assert val is not None, "rank 0 validates every epoch"
        predictions = Predictions.of(val, prepared.val_ids, prepared.dataset.digest)
        model = EpochModel(*_servable(prepared, state), predictions, val.accuracy)
        self.tracker.log_epoch_model(epoch, model, prepared.config.keep_models, state.kept_epoch)


def _params(prepared: Prepared, state: engine.TrainingState) -> dict[str, Any]:
    """Every option, and what was derived from them and from the machine."""
    runtime, dataset = prepared.runtime, prepared.dataset
    return {
        **prepared.config.as_params(),
        # Under `mlflow run`, `device` keeps the launcher's "auto"; this is the one used.
        "compute_device": str(runtime.device),
        "compute_precision": runtime.precision,
        "speedups": ",".join(speedups.active(runtime.device)) or "none",
        "parameter_count": models.parameter_count(state.model),
        "train_size": len(prepared.train),
        "val_size": len(prepared.val),
        "test_size": len(dataset.test) if dataset.test is not None else 0,
        "num_classes": len(dataset.classes),
        # --batch-size is the global batch, shared by this many processes (torchrun).
        "world_size": state.world.size,
        "batch_size_per_process": prepared.config.batch_size // state.world.size,
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
    }


def train(
    prepared: Prepared,
    stop: StopRequests | None = None,
    callbacks: Sequence[engine.Callback] = (),
    tags: dict[str, str] | None = None,
    progress_bars: bool = True,
    project_run: str | None = None,
    handoff: Handoff | None = None,
) -> Summary:
    """Run inside an MLflow run that ends FINISHED, FAILED or KILLED; then register it. The run
    is the resumed one, or `project_run` (the one `mlflow run` made for us), or a new one.

    The training state is checkpointed after every epoch and on a stop request; a stopped
    run raises Interrupted, carrying its run ID. A registration that fails leaves the run
    FINISHED and raises registry.RegistrationFailed. `tags` go on a new run as it starts.
    Under torchrun this is rank 0's part (see `run`).
    """
    config, resumption = prepared.config, prepared.resumption
    run_id = resumption.run_id if resumption is not None else None
    world = handoff.world if handoff is not None else World()
    if world.launch is not None:
        tags = {**(tags or {}), LAUNCH_TAG: world.launch}
    try:
        with lifecycle.mlflow_run(config, run_id, tags, project_run, world.node_id) as tracker:
            run_id = tracker.run_id
            checkpoints = checkpoint.CheckpointFile(
                Path(config.checkpoint_dir).resolve() / f"{run_id}.pt",
                meta={"config": dataclasses.asdict(config), "data_digest": prepared.dataset.digest},
            )
            tracker.record_checkpoint(checkpoints.path)
            summary = run(prepared, tracker, checkpoints, stop, callbacks, progress_bars, handoff)
    # Also a second signal that lands while the run is being ended (`mlflow run` sends its own
    # after the user's Ctrl-C): the message must still name the run to resume.
    except Interrupted as interruption:
        interruption.run_id = run_id
        raise
    if not config.register or summary.run_id is None:
        return summary
    registration = registry.register_finished(
        summary, summary.run_id, config.model_name, config.gate, config.gate_alpha
    )
    return replace(summary, registration=registration)


def follow(world: World, stop: StopRequests) -> bool:
    """A rank other than 0 under torchrun: train with rank 0, from what it hands on, and
    record nothing but this machine's system metrics (by its first rank). Answers whether
    rank 0 started a training at all."""
    start = world.share(None)
    if start is None:
        return False  # rank 0 did not start: it says why
    config = TrainConfig(**start["config"])
    dataset = data.load_dataset(config.data)
    if dataset.digest != start["data_digest"]:
        raise data.DataError(
            f"the data in {dataset.source} (digest {dataset.digest}) is not rank 0's (digest "
            f"{start['data_digest']}): every machine needs the same data"
        )
    _, train, val = _split(config, dataset)
    runtime = engine.Runtime.resolve(config.device, config.precision)
    state = engine.TrainingState.create(config, train, dataset.classes, runtime, world)
    if start["training"] is not None:
        state.load_state_dict(start["training"])
    callbacks = [StopOnDivergence(), Checkpointing(None, Tracker(), stop)]
    node = world.node_id if world.local_rank == 0 else None
    with lifecycle.node_system_metrics(start["run_id"], node), stop.deferred():
        engine.fit(state, val, callbacks)
    return True


def _description(prepared: Prepared, fit: engine.FitResult, test: Evaluation | None) -> str:
    config, dataset = prepared.config, prepared.dataset
    test_line = (
        f"- **Test accuracy**: {test.accuracy:.2%} on {len(test.labels)} held-out images"
        if test is not None
        else "- **Test accuracy**: no test split in this data"
    )
    return "\n".join(
        [
            f"### CIFAR-10 classifier: `{config.model}`",
            "",
            f"- **Data**: `{dataset.source}` ({len(prepared.train)} train / "
            f"{len(prepared.val)} validation images, digest `{dataset.digest}`)",
            f"- **Training**: {config.epochs} epochs, batch {config.batch_size}, SGD lr "
            f"{config.lr} ({config.schedule}), momentum {config.momentum}"
            f"{' (Nesterov)' if config.nesterov else ''}, weight decay {config.weight_decay}, "
            f"label smoothing {config.label_smoothing}, lookahead "
            f"{'on' if config.lookahead else 'off'}, augmentation "
            f"{'on' if config.augment else 'off'}, on {prepared.runtime.device} "
            f"({prepared.runtime.precision})",
            f"- **Kept epoch**: {fit.kept_epoch} (the {config.keep_epoch}), validation accuracy "
            f"{fit.kept_val.accuracy:.2%}",
            test_line,
            "",
            "Load it with `mlflow.pyfunc.load_model('runs:/<run_id>/model')`; it takes a "
            "DataFrame column `image` of PNG or JPEG bytes.",
        ]
    )
