"""POST stage 1: derive a small student from the provider's large LM by dropping layers and distilling."""

from .cache import TeacherCache
from .config import DistillationConfig
from .student import find_layers, make_student
from .trainer import (DistillationCollator, DistillationTrainer, evaluate_distillation, place_teacher,
                      prepare_distillation_dataset, with_task_template)

__all__ = [
    "DistillationCollator",
    "DistillationConfig",
    "DistillationTrainer",
    "TeacherCache",
    "evaluate_distillation",
    "find_layers",
    "make_student",
    "place_teacher",
    "prepare_distillation_dataset",
    "with_task_template",
]
