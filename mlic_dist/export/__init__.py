"""A trained run or ensemble as one model file with its preprocessing, classes and tuned
thresholds: model.py (the module and its metadata), formats.py (ONNX / TorchScript, each checked
against the in-memory model), pyfunc.py (the MLflow pyfunc model `mlflow models serve` answers
with), __main__.py (`python -m mlic_dist.export`)."""
