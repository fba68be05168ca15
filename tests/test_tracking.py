"""The MLflow tracker: what it writes, when, and how a run always ends."""

import contextlib
import logging
import socket
import time

import mlflow
import pytest
import torch

from cifar_experiments import data
from cifar_experiments.config import TrainConfig
from cifar_experiments.interrupts import Interrupted
from cifar_experiments.tracking import keys, lifecycle, links, outage, past_runs, recorder, store


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key)]


def test_metrics_wait_for_a_flush_and_then_all_arrive(monkeypatch):
    monkeypatch.setattr(recorder.MlflowTracker, "FLUSH_SECONDS", 3600)
    with lifecycle.mlflow_run(TrainConfig(experiment_name="t")) as tracker:
        for step in range(1, 1201):  # more than one batch of MLflow's 1000
            tracker.log_metrics({"train/loss": 1 / step}, step=step)
        assert history(tracker.run_id, "train/loss") == []
        tracker.flush()
        assert [s for s, _ in history(tracker.run_id, "train/loss")] == list(range(1, 1201))


def test_a_resumed_run_keeps_each_step_once(monkeypatch):
    with lifecycle.mlflow_run(TrainConfig(experiment_name="t")) as first:
        first.log_metrics({"val/accuracy": 0.5}, step=1)
        first.log_metrics({"val/accuracy": 0.6}, step=2)
    with lifecycle.mlflow_run(TrainConfig(experiment_name="t"), first.run_id) as again:
        for step, value in ((2, 0.6), (3, 0.7)):  # step 2 replayed from the checkpoint
            again.log_metrics({"val/accuracy": value}, step=step)
    assert history(first.run_id, "val/accuracy") == [(1, 0.5), (2, 0.6), (3, 0.7)]


@pytest.mark.parametrize(
    ("error", "status", "tag"),
    [
        (None, "FINISHED", None),
        (Interrupted(2), "KILLED", "interrupted by SIGINT"),
        (RuntimeError("out of memory"), "FAILED", "RuntimeError: out of memory"),
    ],
)
def test_a_run_always_ends_with_its_status_and_reason(tmp_path, error, status, tag):
    saved = tmp_path / "state.pt"
    saved.write_bytes(b"checkpoint")
    expected = pytest.raises(type(error)) if error else contextlib.nullcontext()
    with expected, lifecycle.mlflow_run(TrainConfig(experiment_name="t")) as tracker:
        tracker.record_checkpoint(saved)
        if error:
            raise error
    run = mlflow.MlflowClient().get_run(tracker.run_id)
    assert run.info.status == status
    assert run.data.tags.get(keys.ERROR_TAG) == tag
    assert run.data.tags[keys.CHECKPOINT_TAG] == str(saved)
    assert past_runs.download_checkpoint(tracker.run_id, tmp_path / "back").read_bytes() == (
        b"checkpoint"
    )
    # A stopped or failed run keeps its file to resume from; a finished one has no use for it.
    assert saved.exists() == (status != "FINISHED")


def test_ctrl_c_during_a_store_write_stops_the_run_as_ctrl_c_does(tmp_path, monkeypatch):
    """A stop request raised inside MLflow's SQL store comes out as MLflow's internal error
    (HTTP 500 in its words), which read as a lost server: the run was marked FAILED and a sweep
    went on to its next trial (seen once under load)."""
    with (
        pytest.raises(Interrupted),
        lifecycle.mlflow_run(TrainConfig(experiment_name="t")) as tracker,
    ):
        try:
            raise Interrupted(2)
        except Interrupted as stop:
            raise mlflow.exceptions.MlflowException(
                f"(raised during a write) {stop}", error_code="INTERNAL_ERROR"
            ) from stop
    run = mlflow.MlflowClient().get_run(tracker.run_id)
    assert (run.info.status, run.data.tags[keys.ERROR_TAG]) == ("KILLED", "interrupted by SIGINT")


@pytest.mark.parametrize(("keep", "kept"), [(False, False), (True, True)])
def test_a_finished_child_run_keeps_no_checkpoint_unless_asked(tmp_path, keep, kept):
    """A sweep's trials are many: finished, they leave neither file nor artifact behind."""
    parent = mlflow.MlflowClient().create_run(mlflow.set_experiment("t").experiment_id).info.run_id
    saved = tmp_path / "state.pt"
    saved.write_bytes(b"checkpoint")
    config = TrainConfig(experiment_name="t", keep_checkpoints=keep)
    with lifecycle.mlflow_run(config, tags={keys.PARENT_TAG: parent}) as tracker:
        tracker.record_checkpoint(saved)
    logged = mlflow.MlflowClient().list_artifacts(tracker.run_id, keys.CHECKPOINT_ARTIFACT_DIR)
    assert (bool(logged), saved.exists()) == (kept, kept)


API_FAILED = "API request to http://team:5000/api/2.0/mlflow/runs/log-batch failed with exception "
UNANSWERED = {
    "connection refused": API_FAILED + "HTTPConnectionPool(host='team', port=5000): Max retries "
    'exceeded (Caused by NewConnectionError("...: [Errno 111] Connection refused"))',
    "connection aborted": API_FAILED + "HTTPConnectionPool(host='team', port=5000): Max retries "
    "exceeded (Caused by ProtocolError('Connection aborted.', RemoteDisconnected('Remote end')))",
    "too many 503 error responses": API_FAILED + "HTTPConnectionPool(host='team', port=5000): "
    "Max retries exceeded (Caused by ResponseError('too many 503 error responses'))",
}


def test_a_dataset_another_training_logged_meanwhile_is_linked_not_fatal(tmp_path, monkeypatch):
    """Trainings started together log the same dataset; MLflow looks for it, then inserts it,
    so all but one may meet the database's refusal of a second row (PostgreSQL's words here)."""
    images = data.ImageSet(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.arange(4) % 2)
    dataset = data.Dataset("shared", str(tmp_path), ("a", "b"), images, None)
    log_input, raced = mlflow.log_input, []

    def another_run_inserted_it_first(*args, **kwargs):
        if not raced:
            raced.append(True)
            raise mlflow.exceptions.MlflowException(
                'BAD_REQUEST: (psycopg.errors.UniqueViolation) duplicate key value violates '
                'unique constraint "dataset_pk"'
            )  # fmt: skip
        return log_input(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", another_run_inserted_it_first)
    monkeypatch.setattr(store.time, "sleep", lambda seconds: None)
    with lifecycle.mlflow_run(TrainConfig(experiment_name="t")) as tracker:
        tracker.log_dataset(dataset)
    (logged,) = mlflow.get_run(tracker.run_id).inputs.dataset_inputs
    assert raced and (logged.dataset.name, logged.dataset.digest) == ("shared", dataset.digest)


def test_each_retry_of_a_server_that_does_not_answer_is_said_in_a_line(monkeypatch, capfd):
    """A training whose server went away waits minutes in MLflow's retries; it says so."""
    with socket.socket() as closed:  # a port that refuses: bound, never listening
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
        mlflow.set_tracking_uri(url)
        monkeypatch.setattr(logging.getLogger("urllib3.connectionpool"), "handlers", [])
        outage.show_retries()
        outage.show_retries()  # as a second command in one process: still one line a retry
        with pytest.raises(mlflow.exceptions.MlflowException):
            mlflow.MlflowClient().search_experiments()
    lines = capfd.readouterr().err.splitlines()
    said = f"The tracking server {url} did not answer (connection refused); MLflow tries again"
    assert lines == [f"{said} (retries left: 1)", f"{said} (retries left: 0)"]


@pytest.mark.parametrize(("reason", "message"), UNANSWERED.items(), ids=UNANSWERED)
def test_a_server_lost_mid_run_is_told_in_a_line_with_where_its_checkpoint_is(
    tmp_path, reason, message
):
    error = mlflow.exceptions.MlflowException(message)
    assert outage.server_lost(error)
    saved = tmp_path / "run.pt"
    saved.write_bytes(b"state")
    assert str(outage.ServerLost("abc", saved, error)) == (
        f"lost the tracking server {store.tracking_uri()} ({reason}) during run abc; its "
        f"checkpoint is in {saved}"
    )
    assert str(outage.ServerLost("abc", None, error)).endswith("before its first checkpoint")


def test_only_an_unanswering_or_failing_server_counts_as_lost():
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    assert outage.server_lost(MlflowException("database down", error_code=codes.INTERNAL_ERROR))
    assert not outage.server_lost(MlflowException("gone", error_code=codes.RESOURCE_DOES_NOT_EXIST))
    assert not outage.server_lost(MlflowException("denied", error_code=codes.PERMISSION_DENIED))
    assert not outage.server_lost(RuntimeError(API_FAILED))


def test_a_refusal_in_an_experiment_made_just_now_is_waited_out_and_an_old_one_is_not(
    monkeypatch,
):
    """MLflow's auth app grants a new experiment's creator MANAGE only after committing it:
    trainings started together may be refused in it for a moment."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    monkeypatch.setattr(store.time, "sleep", lambda seconds: None)

    def refused_twice():
        answers = iter([False, False, True])

        def create_run() -> str:
            if not next(answers):
                raise MlflowException("Permission denied", error_code=codes.PERMISSION_DENIED)
            return "run"

        return create_run

    def experiment(made_seconds_ago: float) -> mlflow.entities.Experiment:
        made = int((time.time() - made_seconds_ago) * 1000)
        return mlflow.entities.Experiment("1", "e", "", "active", creation_time=made)

    assert store.once_granted(experiment(made_seconds_ago=1), refused_twice()) == "run"
    with pytest.raises(MlflowException, match="Permission denied"):
        store.once_granted(experiment(made_seconds_ago=3600), refused_twice())


def test_params_already_logged_by_mlflow_run_are_kept_as_typed():
    with lifecycle.mlflow_run(TrainConfig(experiment_name="t")) as tracker:
        mlflow.log_param("lr", "2e-2")  # as `mlflow run -P lr=2e-2` logs it
        tracker.log_params({"lr": 0.02, "epochs": 3})
    params = mlflow.MlflowClient().get_run(tracker.run_id).data.params
    assert params == {"lr": "2e-2", "epochs": "3"}


def test_finding_runs_and_the_store(tmp_path, monkeypatch):
    with pytest.raises(store.TrackingError, match="no run 0000"):
        past_runs.find_run("0" * 32)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri("sqlite:///relative.db")
    assert store.tracking_uri() == f"sqlite:///{tmp_path / 'relative.db'}"
    store.check_store()  # creates the store's tables, under its lock
    assert (tmp_path / "relative.db").is_file()


def test_the_ui_address_printed_is_the_servers_own_or_the_command_that_starts_one(monkeypatch):
    page = "#/experiments/3/runs/abc?workflowType=machine_learning"
    mlflow.set_tracking_uri("http://alice:s3cret@tracking.example:5000/")
    assert links.browse(page) == f"open http://tracking.example:5000/{page}"
    mlflow.set_tracking_uri("sqlite:////data/mlflow.db")
    assert links.browse(page) == (
        f"mlflow ui --backend-store-uri sqlite:////data/mlflow.db, then open "
        f"http://127.0.0.1:5000/{page}"
    )


def test_experiments_used_are_marked_for_model_training_once_and_never_overwritten():
    with lifecycle.mlflow_run(TrainConfig(experiment_name="t")) as tracker:
        pass
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(tracker.run_id).info.experiment_id
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )
    assert links.run_page(tracker.run_id) == (
        f"#/experiments/{experiment_id}/runs/{tracker.run_id}?workflowType=machine_learning"
    )
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "genai_development")
    store.mark_as_training(experiment_id)  # someone chose otherwise: theirs to keep
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == (
        "genai_development"
    )
