"""mmkd: knowledge distillation across graphs and modalities.

The core: :class:`Net` / :class:`Teacher` (models plus the batch keys they read), the
:class:`Distiller` (student + teachers + router + loss terms), the loss library
(:mod:`mmkd.losses`), the teacher-output cache and the one :class:`Trainer`.
"""
from mmkd import losses, models  # noqa: F401  (registration)
from mmkd.cache import CachedTeacher, cache_teacher
from mmkd.data import DataError, DataSplits, TensorDictDataset
from mmkd.distiller import Distiller, Term
from mmkd.losses import register_loss
from mmkd.net import Net, Output, Teacher
from mmkd.registry import DATASETS, LOSSES, MODELS, ROUTERS
from mmkd.trainer import FitResult, Trainer, TrainerConfig

__version__ = "0.1.0"
__all__ = ["Net", "Teacher", "Output", "Distiller", "Term", "Trainer", "TrainerConfig", "FitResult",
           "TensorDictDataset", "DataSplits", "DataError", "CachedTeacher", "cache_teacher", "register_loss",
           "LOSSES", "ROUTERS", "MODELS", "DATASETS"]
