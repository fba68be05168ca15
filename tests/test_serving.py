"""`mlflow models serve` of a logged model, over HTTP on loopback, as a client meets it."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest
from helpers import (
    JPEG,
    NO_JOBS,
    NO_PICKLES,
    PNG,
    assert_labels,
    b64,
    local_env,
    mlflow_run_command,
    post,
    running,
    serve,
)  # fmt: skip
from PIL import Image


@pytest.fixture(scope="module")
def server(finished_run, tmp_path_factory):
    """The registered champion (the finished run's model) behind `mlflow models serve`."""
    _, client, _ = finished_run
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serve("models:/cifar10-classifier@champion", client.tracking_uri, log) as url:
        yield url


@pytest.mark.slow
@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_split": {"columns": ["image"], "data": [[b64(PNG)], [b64(JPEG)]]}},
        {"dataframe_records": [{"image": b64(PNG)}, {"image": b64(JPEG)}]},
        {"inputs": {"image": [b64(PNG), b64(JPEG)]}},
    ],
    ids=["dataframe_split", "dataframe_records", "inputs"],
)
def test_png_and_jpeg_are_labelled_in_every_body_format(server, body):
    status, answer = post(server, body)
    assert status == 200, answer
    assert_labels(answer, 2)


def huge_canvas() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS = {
    "not an image": ({"dataframe_split": {"columns": ["image"], "data": [[b64(b"hello")]]}},
                     "not a readable image"),
    "truncated file": ({"dataframe_split": {"columns": ["image"], "data": [[b64(PNG[:100])]]}},
                       "not a readable image"),
    "wrong column": ({"dataframe_split": {"columns": ["img"], "data": [[b64(PNG)]]}}, "image"),
    "too large to decode": ({"dataframe_records": [{"image": b64(huge_canvas())}]},
                            "too large to decode safely"),
    "bad base64 in inputs": ({"inputs": {"image": ["bm90IGJhc2U2NA=x"]}}, "row 0"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_one_line_message_and_the_server_goes_on(server, case):
    body, expected = BAD_REQUESTS[case]
    status, answer = post(server, body)
    assert 400 <= status < 500, (status, answer)
    message = answer["message"]
    assert expected in message
    assert "\n" not in message and "Traceback" not in json.dumps(answer)
    status, answer = post(server, {"dataframe_records": [{"image": b64(JPEG)}]})
    assert status == 200
    assert_labels(answer, 1)


@pytest.mark.slow
def test_empty_batch_answers_an_empty_list(server):
    status, answer = post(server, {"dataframe_split": {"columns": ["image"], "data": []}})
    assert (status, answer) == (200, {"predictions": []})


@pytest.mark.slow
def test_mlflow_run_trains_and_registers_through_a_tracking_server(image_folder, tmp_path):
    """`mlflow server` on loopback: `mlflow run` makes its run there, and the training fills it
    in and registers it there. (Serving from a server is tested in tests/team.)"""

    def tracking_server(port: int) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                "--artifacts-destination", str(tmp_path / "artifacts")]  # fmt: skip

    with running(
        tracking_server, local_env(**NO_JOBS), "/health", tmp_path / "tracking.log"
    ) as uri:
        done = subprocess.run(
            mlflow_run_command(epochs=1, batch_size=8, data=image_folder),
            env=local_env(MLFLOW_TRACKING_URI=uri), cwd=tmp_path, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Registered cifar10-classifier version 1; champion -> version 1" in done.stdout
        client = mlflow.MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
        champion = client.get_model_version_by_alias("cifar10-classifier", "champion")
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert champion.run_id == run.info.run_id


class Echo(mlflow.pyfunc.PythonModel):
    """A model saved as a Python object, which MLflow pickles."""

    def predict(self, context, model_input):
        return model_input


def test_the_logged_model_loads_where_pickled_models_are_refused(finished_run, tmp_path):
    """Under MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (every server here runs so) MLflow
    refuses a pickled model, and loads ours: nothing in it needs unpickling."""
    _, client, run_id = finished_run
    mlflow.pyfunc.save_model(path=tmp_path / "pickled", python_model=Echo())
    # One process for the three (MLflow takes seconds to start): a line each, what happened.
    load_each = (
        "import sys, mlflow\n"
        "for uri in sys.argv[1:]:\n"
        "    try:\n"
        "        mlflow.pyfunc.load_model(uri)\n"
        "        print('loaded')\n"
        "    except Exception as error:\n"
        "        print('refused:', str(error).splitlines()[0])\n"
    )
    uris = [tmp_path / "pickled", f"runs:/{run_id}/model", "models:/cifar10-classifier@champion"]
    env = local_env(MLFLOW_TRACKING_URI=client.tracking_uri, **NO_PICKLES)
    done = subprocess.run([sys.executable, "-c", load_each, *map(str, uris)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    pickled, logged, champion = done.stdout.splitlines()
    assert pickled.startswith("refused:") and "pickle is disallowed" in pickled, pickled
    assert (logged, champion) == ("loaded", "loaded"), done.stderr[-2000:]
