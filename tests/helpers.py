"""What several test modules use: tiny synthetic images, this interpreter for child processes,
and a model server to talk to. Test modules import from here, never from one another."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from cifar_experiments import callbacks, data

CLASSES = ("cat", "dog", "frog")
TRAIN_PER_CLASS = 10
TEST_PER_CLASS = 4
ROOT = Path(__file__).resolve().parents[1]


def synthetic_images(n: int, label: int, seed: int) -> np.ndarray:
    """(n, 32, 32, 3) uint8: a class colour plus noise, so a few steps can learn something."""
    rng = np.random.default_rng(seed)
    colour = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][label % 3], dtype=np.int16)
    noise = rng.integers(-40, 40, size=(n, 32, 32, 3))
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def tiny_set(per_class: int, seed: int) -> data.ImageSet:
    """`per_class` synthetic images of each of three classes, as training reads them."""
    arrays = [synthetic_images(per_class, label, seed + label) for label in range(3)]
    images = torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2)
    labels = torch.arange(3).repeat_interleave(per_class)
    return data.ImageSet(images.contiguous(), labels)


def write_image_folder(root: Path, counts: dict[str, int], fmt: str = "PNG") -> Path:
    """root/<split>/<class>/NNNN.<ext> with counts[split] images of each class."""
    for split, count in counts.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, image in enumerate(synthetic_images(count, label, seed=label + 10 * count)):
                (folder / f"{i:04d}.{fmt.lower()}").write_bytes(encode(image, fmt))
    return root


class RecordingTracker(callbacks.Tracker):
    """Keeps every metric point it is given, by name: [(step, value), ...]."""

    def __init__(self) -> None:
        self.points: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.points.setdefault(name, []).append((step, value))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_env(**extra: str) -> dict[str, str]:
    """This environment with this interpreter first on PATH: `mlflow run --env-manager local`
    and `mlflow models serve --env-manager local` start plain `python`."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, **extra}


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], health_url: str, log_path: Path):
    """Start a server process, wait (at most 90 s) until `health_url` answers, stop it after."""
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    urllib.request.urlopen(health_url, timeout=2)
                    break
                except OSError:
                    assert process.poll() is None, log_path.read_text()[-3000:]
                    assert time.monotonic() < deadline, "no answer within 90 s"
                    time.sleep(0.5)
            yield
        finally:
            process.terminate()
            process.wait(timeout=30)


def serve(model_uri: str, tracking_uri: str, log_path: Path) -> tuple[str, Iterator[None]]:
    """`mlflow models serve` of `model_uri` on a free loopback port: its URL, and the context
    in which it runs."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    env = local_env(MLFLOW_TRACKING_URI=tracking_uri)
    return url, running(command, env, f"{url}/ping", log_path)


def post(url: str, body: bytes | dict, content_type: str = "application/json") -> tuple[int, dict]:
    """POST `body` (JSON-encoded unless bytes) to the model server's /invocations: the status
    and the JSON answer ({} when the answer is not JSON)."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    answer = requests.post(f"{url}/invocations", data=payload, headers=headers, timeout=60)
    try:
        return answer.status_code, answer.json()
    except requests.JSONDecodeError:
        return answer.status_code, {}


def b64(content: bytes) -> str:
    return base64.b64encode(content).decode()


IMAGES = synthetic_images(2, 0, 7)
PNG, JPEG = encode(IMAGES[0], "PNG"), encode(IMAGES[1], "JPEG")


def assert_labels(answer: dict, count: int) -> None:
    rows = answer["predictions"]
    assert len(rows) == count
    for row in rows:
        assert row["label"] in CLASSES and row["label"] == CLASSES[row["class_index"]]
        assert sum(row[f"prob_{c}"] for c in CLASSES) == pytest.approx(1.0, abs=1e-6)
