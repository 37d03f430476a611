"""Training: one `train(cfg)` for every launcher (accelerate launch, torchrun, Ray Train workers).

    loop.py         build_run -> train_one_epoch -> evaluate -> fit: `train(cfg)`
    scoring.py      scoring a split across ranks, every sample once
    optim.py        parameter groups, schedules, the global-batch rule, warmup
    ema.py          the weight EMA
    teacher.py      distillation: the teacher's cached probabilities, their check, the blended targets
    distributed.py  the Accelerator and what DDP ranks need from each other
    checkpoint.py   atomic checkpoints that survive kill -9
    resume.py       saving the run's state and resuming it without changing what it means
    __main__.py     `python -m mlic_dist.train`
"""
from .loop import Run, TrainState, build_run, train, train_one_epoch

__all__ = ["Run", "TrainState", "build_run", "train", "train_one_epoch"]
