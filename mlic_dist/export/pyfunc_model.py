"""The "model from code" file of mlic_dist's MLflow pyfunc model (mlic_dist/export/pyfunc.py logs it):
MLflow runs this file when it loads the model, instead of unpickling an object, and it only names
the model class. The package itself travels with the model (log_model's code_paths)."""
import mlflow

from mlic_dist.export.pyfunc import MlicPyfunc  # absolute: MLflow runs this file by path

mlflow.models.set_model(MlicPyfunc())
