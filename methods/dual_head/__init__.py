"""Dual-head students: the model ``dual_head`` (:mod:`.model`), a backbone with a CE head and a KD head,
and the two methods built on it: DHO (:mod:`.dho`, heads combined at inference) and Dual-Head KD
(:mod:`.kd`, the binary KL loss on the auxiliary head, optional gradient alignment)."""

from .dho import ALPHAS, BETAS, calibrate, combine, search_alpha_beta  # noqa: F401
from .kd import align_gradients  # noqa: F401  (registers the bkl loss)
from .model import DualHead, dual_head  # noqa: F401  (registers the dual_head model)
