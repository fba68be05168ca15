"""The logged model: encoded image files in, a class name and probabilities out.

Logged as code, not as a pickle: MLflow runs `pyfunc_entry.py` with this package beside it
(`code_paths`); the weights and a small JSON of settings (network, class names,
normalisation) travel as the model's artifacts, so `mlflow.pyfunc.load_model` and
`mlflow models serve` need nothing else on the path.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc.model import PythonModel, PythonModelContext
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from . import data, models

# A bound on each image, so that no single file can exhaust memory as it is decoded
# (data.decode_image also bounds its pixels). A request of any length is worked through in
# chunks of PREDICT_BATCH images, so only one chunk is ever decoded at a time.
MAX_IMAGE_BYTES = 8 * 1024 * 1024
BASE64_TEXT = re.compile(rb"^[A-Za-z0-9+/]+={0,2}$")

WEIGHTS_ARTIFACT = "weights"
SETTINGS_ARTIFACT = "settings"
IMAGE_COLUMN = "image"
PREDICT_BATCH = 256


def probability_column(class_name: str) -> str:
    return f"prob_{class_name}"


class CifarClassifier(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        config = json.loads(Path(context.artifacts[SETTINGS_ARTIFACT]).read_text())
        self.classes = tuple(config["classes"])
        self.normalization = data.Normalization(tuple(config["mean"]), tuple(config["std"]))
        net = models.build_model(config["model_name"], num_classes=len(self.classes))
        state = torch.load(
            context.artifacts[WEIGHTS_ARTIFACT], map_location="cpu", weights_only=True
        )
        net.load_state_dict(state)
        self._net = net.eval()

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        """Labels for a DataFrame of any length (pandas, a Spark UDF's batches)."""
        column = _column(model_input).tolist()
        chunks = [
            self._probabilities(
                torch.stack([_decode(value, start + i) for i, value in enumerate(chunk)])
            )
            for start in range(0, len(column), PREDICT_BATCH)
            if (chunk := column[start : start + PREDICT_BATCH])
        ]
        return self._rows(torch.cat(chunks) if chunks else torch.empty(0, len(self.classes)))

    @torch.no_grad()
    def _probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return models.predict_log_proba(self._net, self.normalization(images)).exp()

    def _rows(self, probabilities: torch.Tensor) -> pd.DataFrame:
        table = probabilities.double().numpy()
        index = table.argmax(axis=1)
        # Made in one go: adding columns one by one cost more than the network's forward pass.
        return pd.DataFrame(
            {
                "label": [self.classes[i] for i in index.tolist()],
                "class_index": index.astype("int64"),
                "score": table.max(axis=1),
                **{probability_column(name): table[:, i] for i, name in enumerate(self.classes)},
            }
        )


def settings(
    model_name: str, classes: tuple[str, ...], normalization: data.Normalization
) -> dict[str, Any]:
    """What `load_context` needs besides the weights."""
    return {
        "model_name": model_name,
        "classes": list(classes),
        "mean": list(normalization.mean),
        "std": list(normalization.std),
    }


def signature(classes: tuple[str, ...]) -> ModelSignature:
    outputs: list[ColSpec | TensorSpec] = [
        ColSpec("string", "label"),
        ColSpec("long", "class_index"),
        ColSpec("double", "score"),
    ]
    outputs += [ColSpec("double", probability_column(name)) for name in classes]
    # Optional only so that MLflow lets a request without it reach `predict`, which then answers
    # with one clear line; MLflow's own schema error echoes the request back over many lines.
    inputs = Schema([ColSpec("binary", IMAGE_COLUMN, required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


def example_input(encoded_image: bytes) -> pd.DataFrame:
    return pd.DataFrame({IMAGE_COLUMN: [encoded_image]})


@functools.cache  # every epoch's model asks; reading packages' metadata takes milliseconds
def pip_requirements() -> list[str]:
    """What the served model imports, pinned to the versions it was trained with."""
    names = ["mlflow", "torch", "numpy", "pandas", "pillow", "tqdm"]
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in names]


def predict_files(model_uri: str, files: list[Path]) -> pd.DataFrame:
    """Label image files with any MLflow model URI; a `file` column leads the answer.

    Raises ValueError naming the first file that is not a readable image, before loading
    the model, and MlflowException when the model cannot be loaded.
    """
    encoded = []
    for path in files:
        content = path.read_bytes()
        try:
            data.decode_image(content)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        encoded.append(content)
    model = mlflow.pyfunc.load_model(model_uri)
    answer = model.predict(pd.DataFrame({IMAGE_COLUMN: encoded}))
    answer.insert(0, "file", [str(p) for p in files])
    return answer


class BadRequest(MlflowException):
    """A request the model cannot serve: the server answers 400 with this one-line message.

    MLflow's scoring server rewrites an exception's message to start with the whole input's
    repr (many lines, and the client's own data echoed back); this message keeps its first
    value so the answer says only what was wrong.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value


def _column(model_input: pd.DataFrame) -> pd.Series:
    if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
        raise BadRequest(
            f"expected a column {IMAGE_COLUMN!r} of encoded images (PNG or JPEG bytes; base64 "
            "in JSON bodies)"
        )
    return model_input[IMAGE_COLUMN]


def _decode(value: Any, row: int) -> torch.Tensor:
    if isinstance(value, str):
        value = value.encode("ascii", errors="replace")
    if not isinstance(value, bytes | bytearray):
        raise BadRequest(f"row {row}: expected image bytes, got {type(value).__name__}")
    value = bytes(value)
    if BASE64_TEXT.match(value):
        # `inputs` bodies reach the model as base64 text; dataframe bodies arrive decoded.
        # No image format starts with base64's alphabet, so the two cannot be confused;
        # what does not decode is left as it is, and fails below as not an image.
        with contextlib.suppress(binascii.Error, ValueError):
            value = base64.b64decode(value, validate=True)
    if len(value) > MAX_IMAGE_BYTES:
        raise BadRequest(
            f"row {row}: {len(value):,} bytes; images are limited to {MAX_IMAGE_BYTES:,}"
        )
    try:
        return data.decode_image(value)
    except ValueError as error:
        raise BadRequest(f"row {row}: {error}") from None
