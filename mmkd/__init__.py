"""mmkd: knowledge distillation across graphs and modalities.

The core: :class:`Net` / :class:`Teacher` (models plus the batch keys they read), the
:class:`Distiller` (student + teachers + router + loss terms), the loss library
(:mod:`mmkd.losses`), the teacher-output cache and the one :class:`Trainer` with its extension points:
:mod:`~mmkd.callbacks`, :mod:`~mmkd.metrics`, :mod:`~mmkd.transforms` (batch transforms) and
:mod:`~mmkd.policies` (data policies).
"""
from mmkd import losses, models  # noqa: F401  (registration)
from mmkd.cache import CachedTeacher, cache_teacher
from mmkd.callbacks import Callback
from mmkd.data import DataError, DataSplits, TensorDictDataset
from mmkd.distiller import Distiller, Term
from mmkd.losses import register_loss
from mmkd.net import Net, Output, Teacher
from mmkd.registry import DATASETS, LOSSES, MODELS, ROUTERS
from mmkd.policies import DataPolicy
from mmkd.trainer import FitResult, Trainer, TrainerConfig
from mmkd.transforms import BatchTransform

__version__ = "0.1.0"
__all__ = ["Net", "Teacher", "Output", "Distiller", "Term", "Trainer", "TrainerConfig", "FitResult",
           "Callback", "BatchTransform", "DataPolicy", "TensorDictDataset", "DataSplits", "DataError", "CachedTeacher", "cache_teacher", "register_loss",
           "LOSSES", "ROUTERS", "MODELS", "DATASETS"]
