"""The paper in miniature, offline: scenes.py builds the dataset from scikit-image's photographs,
run.py shards it and runs the demo sweep (or one run), __main__.py is `python -m mlic_dist.demo`."""
