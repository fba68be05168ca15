"""`mlflow models serve` of a logged model, over HTTP on loopback, as a client meets it."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import CLASSES, encode, synthetic_images
from PIL import Image

from cifar_experiments import serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(finished_run, tmp_path_factory):
    """The finished run's model behind `mlflow models serve`, stopped after the module."""
    _, client, run_id = finished_run
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": client.tracking_uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    log = (tmp_path_factory.mktemp("serve") / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=2)
            break
        except OSError:
            assert process.poll() is None, Path(log.name).read_text()[-3000:]
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("the model server did not start within 90 s")
    yield url
    process.terminate()
    process.wait(timeout=30)


def post(url: str, body: bytes | dict) -> tuple[int, object]:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/invocations", data=payload, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def b64(content: bytes) -> str:
    return base64.b64encode(content).decode()


IMAGES = synthetic_images(2, 0, 7)
PNG, JPEG = encode(IMAGES[0], "PNG"), encode(IMAGES[1], "JPEG")


def assert_labels(answer: object, count: int) -> None:
    rows = answer["predictions"]
    assert len(rows) == count
    for row in rows:
        assert row["label"] in CLASSES and row["label"] == CLASSES[row["class_index"]]
        assert sum(row[f"prob_{c}"] for c in CLASSES) == pytest.approx(1.0, abs=1e-6)


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
    "too many images": ({"inputs": {"image": [b64(PNG)] * (serving.MAX_IMAGES + 1)}},
                        "send at most"),
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
