"""Score-level fusion of trained runs (the paper's eq. 3), written and logged like a run:
members.py (the runs an ensemble fuses, aligned by sample key, and the fusion), selection.py
(ScaleEn / DistrEn groups and greedy selection), build.py (one ensemble, or every one of an
experiment), __main__.py (`python -m mlic_dist.ensemble`)."""
