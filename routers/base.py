"""Registering routers; the :class:`~mmkd.router.Router` interface itself is in the core."""
from __future__ import annotations

from typing import Callable

from mmkd.registry import ROUTERS
from mmkd.router import Router

__all__ = ["Router", "register_router"]


def register_router(name: str) -> Callable:
    """Register a :class:`~mmkd.router.Router` subclass under ``name`` (usable as ``router.name`` in configs)."""
    return ROUTERS.register(name)
