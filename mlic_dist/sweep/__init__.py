"""Grid sweeps on Ray Tune + Ray Train, tracked in MLflow: `python launch/sweep.py` (see there).

    spec.py      sweep file -> validated grid -> trials (names, output dirs, configs)
    cluster.py   start / join Ray, trials per cluster, shared-storage checks on every node
    tune.py      the Tuner, the per-trial driver (a TorchTrainer) and the Ray Train worker
    progress.py  the compact progress view (a Tune callback)
    results.py   trial outcomes, MLflow child runs, the trial table, the UI hint
    run.py       run_sweep(): the order of all of the above

Ray and MLflow are imported inside the functions that use them.
"""
