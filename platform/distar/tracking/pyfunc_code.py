"""The file MLflow stores with every registered generator ("models from code"): loading the model
runs it, and it names the pyfunc class, so no pickled object travels with the weights."""

import mlflow

from distar.tracking.registry import GeneratorModel

mlflow.models.set_model(GeneratorModel())
