"""Distillation: one student trained on the labels blended with a teacher's probabilities.

    teacher.py   the teacher (a run or a fused ensemble), its probabilities on the training
                 images computed once and cached (train/teacher.py owns the cache's format)
    __main__.py  `python -m mlic_dist.distill --teacher DIR --config FILE [key=value ...]`
"""
from .teacher import DistillError, Teacher, distill, load_teacher, teacher_probabilities

__all__ = ["DistillError", "Teacher", "distill", "load_teacher", "teacher_probabilities"]
