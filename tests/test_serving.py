"""`mlflow models serve` of a logged model, over HTTP on loopback, as a client meets it."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest
from helpers import (
    JPEG,
    NO_PICKLES,
    PNG,
    ROOT,
    assert_labels,
    b64,
    local_env,
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
def test_train_register_and_serve_through_a_tracking_server(image_folder, tmp_path):
    """`mlflow server` on loopback: `mlflow run` registers there, and serving reads from there."""

    def tracking_server(port: int) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                "--artifacts-destination", str(tmp_path / "artifacts")]  # fmt: skip

    with running(tracking_server, local_env(), "/health", tmp_path / "tracking.log") as uri:
        done = subprocess.run(
            [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local",
             "-P", "epochs=1", "-P", "batch_size=8", "-P", f"data={image_folder}"],
            env=local_env(MLFLOW_TRACKING_URI=uri), cwd=tmp_path, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Registered cifar10-classifier version 1; champion -> version 1" in done.stdout
        with serve("models:/cifar10-classifier@champion", uri, tmp_path / "serve.log") as url:
            status, answer = post(url, {"inputs": {"image": [b64(PNG)]}})
    assert status == 200, answer
    assert_labels(answer, 1)


class Echo(mlflow.pyfunc.PythonModel):
    """A model saved as a Python object, which MLflow pickles."""

    def predict(self, context, model_input):
        return model_input


def test_the_logged_model_loads_where_pickled_models_are_refused(finished_run, tmp_path):
    """Under MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (every server here runs so) MLflow
    refuses a pickled model, and loads ours: nothing in it needs unpickling."""
    _, client, run_id = finished_run
    mlflow.pyfunc.save_model(path=tmp_path / "pickled", python_model=Echo())
    load = "import sys, mlflow; mlflow.pyfunc.load_model(sys.argv[1]); print('loaded')"
    env = local_env(MLFLOW_TRACKING_URI=client.tracking_uri, **NO_PICKLES)

    def loads(uri: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", load, uri], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    refused = loads(str(tmp_path / "pickled"))
    assert refused.returncode != 0 and "Deserializing model using pickle is disallowed" in (
        refused.stderr
    )
    for uri in (f"runs:/{run_id}/model", "models:/cifar10-classifier@champion"):
        ours = loads(uri)
        assert ours.returncode == 0 and ours.stdout.strip() == "loaded", ours.stderr[-2000:]
