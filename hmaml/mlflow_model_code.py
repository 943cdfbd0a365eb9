"""The "models from code" definition of hmaml's MLflow model: MLflow runs this file when it loads
the model (see :mod:`hmaml.mlflow_model`)."""

from mlflow.models import set_model

from hmaml.mlflow_model import FewShotTaskModel

set_model(FewShotTaskModel())
