"""The file MLflow runs to load a logged classifier (models from code, no pickle)."""

import mlflow

from cifar_experiments.serving import CifarClassifier

mlflow.models.set_model(CifarClassifier())
