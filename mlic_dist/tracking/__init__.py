"""MLflow, for every process that tracks or reads runs (the one place besides export/pyfunc.py
that imports mlflow; it is imported lazily, so a trainer without it runs with tracking off):

    store.py    where runs are tracked: the URI, the embedded local store, experiments
    tracker.py  `Tracker`: a training run's params, metrics, tags and artifacts, queued off the
                training loop on rank 0 (never stalls training)
    derived.py  a run made from other runs (an ensemble, a report) logged like a run
    query.py    reading runs back: finished runs of an experiment, their run directories
    server.py   an `mlflow server` over a local store, for many processes (a sweep's trials)
"""
