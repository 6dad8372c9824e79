"""Name -> object registries for losses, routers, models, data sets, callbacks, metrics, batch
transforms, data policies, backward rules and run pipelines.

Packages outside the core (``mmkd.routers``, ``mmkd.graphs``, ``mmkd.modalities``, ``mmkd.methods`` and third-party
plug-ins) declare themselves under the ``mmkd.plugins`` entry-point group; they are imported the
first time a lookup misses or a full listing is asked for, so the core never imports them itself.
"""
from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import Any, Callable, Iterator

_plugins_loaded = False


def load_plugins() -> None:
    """Import every package registered under the ``mmkd.plugins`` entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    with warnings.catch_warnings():  # deprecation notices that plug-ins' dependencies emit on import
        warnings.simplefilter("ignore", FutureWarning)
        for ep in entry_points(group="mmkd.plugins"):
            ep.load()


class UnknownName(KeyError):
    """A registry lookup for a name that nothing registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class Registry:
    """A mapping from short names to objects (functions, classes, factories) of one kind.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("mlp")
    ... class MLP: ...
    >>> MODELS["mlp"] is MLP
    True
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._modules: dict[str, str] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Any], Any]:
        """Decorator registering an object under ``name``; ``meta`` and the object's ``__module__``
        are kept beside it."""

        def deco(obj: Any) -> Any:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            self._meta[name] = meta
            self._modules[name] = getattr(obj, "__module__", None) or "__main__"  # None: defined by exec
            return obj

        return deco

    def __getitem__(self, name: str) -> Any:
        if name not in self._items:
            load_plugins()
        if name not in self._items:
            raise UnknownName(
                f"unknown {self.kind} {name!r}; choose from: {', '.join(self.names())}"
            )
        return self._items[name]

    def meta(self, name: str) -> dict[str, Any]:
        """The keyword arguments given to :meth:`register` for ``name``."""
        self[name]
        return self._meta[name]

    def module(self, name: str) -> str:
        """The module that defines the object registered under ``name``, e.g. ``"mmkd.losses.kd"``."""
        self[name]
        return self._modules[name]

    def names(self) -> list[str]:
        """All registered names, plug-ins included, sorted."""
        load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self.names()  # plug-ins are loaded only on a miss

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


LOSSES = Registry("loss")
ROUTERS = Registry("router")
MODELS = Registry("model")
DATASETS = Registry("dataset")
CALLBACKS = Registry("callback")  # trainer hooks (mmkd.callbacks)
METRICS = Registry("metric")  # evaluation metrics (mmkd.metrics)
TRANSFORMS = Registry("batch transform")  # batch -> batch before the loss terms (mmkd.transforms)
POLICIES = Registry("data policy")  # the training set between epochs (mmkd.policies)
GRADIENTS = Registry("backward rule")  # losses -> parameter gradients in a training step (mmkd.gradients)
TOKENIZERS = Registry("tokenizer")  # the "type" of a saved tokenizer.json -> its loader, path -> tokenizer
PIPELINES = Registry("pipeline")  # what `mmkd run` does with a config: "distill" (mmkd.run) or a method's stages
