"""Graph splits as data sets the core's Trainer and ``mmkd run`` use unchanged.

A batch is ``{"x": [n, F], "edge_index": [2, e], "label": [n], "index": [n], "node": [n],
"seed": [n]}``: the label is -1 outside the split (the core's CE and evaluation skip such nodes),
``index`` numbers the nodes of the graph the data set is built on (the teacher-output cache looks
rows up by it), ``node`` gives their ids in the original graph and ``seed`` marks the nodes a batch
was drawn for (all of them in full-batch mode; graph losses average their per-node terms over them).

- Full batch (:class:`FullGraph`): a data set of ONE item, the whole graph. Deterministic, so a
  frozen teacher's outputs on it are cached.
- Mini-batch (:class:`NeighborGraph`): one item per seed node; a batch of seeds comes back as their
  sampled neighbourhood (:mod:`graphs.sampling`), labelled on the seeds only. A node's output depends
  on the neighbourhood it was sampled with, so teachers run live on these batches.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmkd.checks import COUNT, SEED, Range
from mmkd.config import ConfigError
from mmkd.data import DataSplits, Fingerprinted, hash_tensors
from mmkd import preprocess
from mmkd.registry import DATASETS
from mmkd.graphs import splits as S
from mmkd.graphs.data import Graph, check_masks
from mmkd.graphs.io import planetoid, read_npz
from mmkd.graphs.sampling import CSC, sample
from mmkd.metrics import task_metrics

log = logging.getLogger("mmkd")

def _hash(name: str, tensors: dict[str, Tensor], extra: str = "") -> str:
    h = hashlib.sha256(f"{name}|{extra}".encode())
    hash_tensors(h, tensors)
    return h.hexdigest()


class FullGraph(Fingerprinted):
    """The whole graph as a data set of one item (full-batch training and evaluation).

    Args:
        name: identifies the data set (part of its fingerprint).
        x, edge_index: the graph the models see.
        label: ``[nodes]``, -1 on nodes outside the split.
        node: the nodes' ids in the original graph (default: ``0..n-1``).
    """

    deterministic = True

    def __init__(self, name: str, x: Tensor, edge_index: Tensor, label: Tensor, node: Tensor | None = None):
        self.name = name
        n = len(x)
        self.tensors = {"x": x, "edge_index": edge_index, "label": label, "index": torch.arange(n),
                        "node": torch.arange(n) if node is None else node, "seed": torch.ones(n, dtype=torch.bool)}
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if i != 0:
            raise IndexError(f"{self.name}: a full-graph data set has one item (0), not {i}")
        return dict(self.tensors)

    def __getitems__(self, ids: Sequence[int]) -> dict[str, Tensor]:
        if any(i != 0 for i in ids):
            raise IndexError(f"{self.name}: a full-graph data set has one item (0), not {list(ids)}")
        return dict(self.tensors)

    @property
    def fingerprint(self) -> str:
        """A hash of the name and the contents: the data set's identity for the teacher cache."""
        if self._fingerprint is None:
            self._fingerprint = _hash(self.name, self.tensors)
        return self._fingerprint


class NeighborGraph(Fingerprinted):
    """Mini-batches of sampled neighbourhoods: item ``i`` is seed node ``seeds[i]``.

    Args:
        name, x, edge_index, label, node: as for :class:`FullGraph`.
        seeds: the nodes batches are drawn for.
        num_neighbors: neighbours sampled per node at each hop (``-1``: all), e.g. ``[10, 10]``.
    """

    deterministic = False  # a node's output depends on the neighbourhood sampled with it

    def __init__(self, name: str, x: Tensor, edge_index: Tensor, label: Tensor, seeds: Tensor,
                 num_neighbors: Sequence[int], node: Tensor | None = None):
        self.name, self.x, self.edge_index, self.label, self.seeds = name, x, edge_index, label, seeds
        self.node = torch.arange(len(x)) if node is None else node
        self.num_neighbors = [int(k) for k in num_neighbors]
        self.csc = CSC(edge_index, len(x))

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, ids: Sequence[int]) -> dict[str, Tensor]:
        seeds = self.seeds[torch.as_tensor(ids, dtype=torch.long)]
        nodes, edge_index = sample(self.csc, seeds, self.num_neighbors)
        is_seed = torch.arange(len(nodes)) < len(seeds)
        label = torch.where(is_seed, self.label[nodes], -1)
        return {"x": self.x[nodes], "edge_index": edge_index, "label": label, "index": nodes,
                "node": self.node[nodes], "seed": is_seed}

    @property
    def fingerprint(self) -> str:
        """A hash of the name, the graph, the seeds and the fan-out."""
        return _hash(self.name, {"x": self.x, "edge_index": self.edge_index, "label": self.label,
                                 "seeds": self.seeds}, str(self.num_neighbors))


def masked(y: Tensor, nodes: Tensor) -> Tensor:
    """``y`` on ``nodes``, -1 elsewhere."""
    out = torch.full_like(y, -1)
    out[nodes] = y[nodes]
    return out


def graph_splits(g: Graph, split: str | None = None, setting: str = "transductive", split_seed: int = 0,
                 split_index: int = 0, held_out: float = 0.2, train_per_class: int = 20, val_per_class: int = 30,
                 normalize: str | bool = "auto", batching: str = "full", num_neighbors: Sequence[int] = (10, 10),
                 eval_neighbors: Sequence[int] | None = None) -> DataSplits:
    """Train/val/test data sets of graph ``g``.

    Args:
        split: ``public`` (a split that ships with the data: Planetoid's, an npz file's masks) or
            ``glnn`` (``train_per_class`` / ``val_per_class`` random labelled nodes per class, the
            rest as test; seeded by ``split_seed``); default: ``public`` when the graph ships a
            split, ``glnn`` otherwise.
        split_index: which shipped split ``public`` uses, for files that ship several (the
            heterophilous benchmarks' ten); sweep them with ``--multirun data.args.split_index=0,...,9``.
        setting: ``transductive`` (all nodes and edges visible, only labels split) or ``inductive``
            (a ``held_out`` fraction of the test nodes and their edges invisible in training; the
            test set is those nodes, evaluated on the full graph).
        normalize: what is done to the node features (see :func:`feature_steps`): ``auto`` (the
            default) divides each row by its sum when every feature is non-negative (counts, bags of
            words, binary) and leaves features with negative values (embeddings) as they are;
            ``row`` always divides by the row sum, ``standardize`` scales each feature to mean 0
            and standard deviation 1 over the nodes seen in training, ``none`` leaves them. ``True``
            and ``False`` are accepted for ``row`` and ``none``. The choice is logged and recorded
            in ``preprocessing["x"]``, so ``mmkd predict`` repeats it.
        batching: ``full`` (one item: the whole graph) or ``neighbor`` (sampled neighbourhoods of
            ``num_neighbors`` per hop for training; ``eval_neighbors`` for val/test, default all).
    """
    split = split or default_split(g)
    parts = node_split(g, split, setting, split_seed, held_out, train_per_class, val_per_class, split_index)
    if batching not in ("full", "neighbor"):
        raise ConfigError(f"data.args.batching={batching!r}; choose from: full, neighbor")
    n = g.num_nodes
    obs = parts.observed(n)  # every node when transductive
    steps = feature_steps(g.x, normalize, obs, g.name)
    x = preprocess.apply(steps, g.x) if steps else g.x
    local = torch.full((n,), -1, dtype=torch.long)
    local[obs] = torch.arange(len(obs))
    x_obs, edges_obs, y_obs = x[obs], S.subgraph(g.edge_index, obs, n), g.y[obs]
    tag = f"{g.name}/{split}/{setting}/{split_seed}" + (f"/{split_index}" if split == "public" and split_index else "")
    hops = list(eval_neighbors) if eval_neighbors is not None else [-1] * len(num_neighbors)

    def build(part: str, xs: Tensor, edges: Tensor, label: Tensor, node: Tensor | None, seeds: Tensor,
              fanout: Sequence[int]) -> Dataset:
        if batching == "full":
            return FullGraph(f"{tag}/{part}", xs, edges, label, node)
        return NeighborGraph(f"{tag}/{part}", xs, edges, label, seeds, fanout, node)

    # teachers and students train on the observed graph; distillation reaches all its nodes
    train = build("train", x_obs, edges_obs, masked(y_obs, local[parts.train]), obs, torch.arange(len(obs)),
                  num_neighbors)
    val = build("val", x_obs, edges_obs, masked(y_obs, local[parts.val]), obs, local[parts.val], hops)
    test_nodes = parts.test if parts.held_out is None else parts.held_out
    test = build("test", x, g.edge_index, masked(g.y, test_nodes), None, test_nodes, hops)
    labelled = None if batching == "full" else build("train-labelled", x_obs, edges_obs, train.label, obs,
                                                       local[parts.train], num_neighbors)
    return DataSplits(train, val, test, labelled=labelled, num_classes=g.num_classes,
                      shapes={"x": (g.x.shape[1],), "edge_index": (2,)},
                      class_names=g.class_names or [str(c) for c in range(g.num_classes)],
                      preprocessing={"x": steps} if steps else {}, metrics=task_metrics(g.y, g.num_classes))


def default_split(g: Graph) -> str:
    """``public`` when a split ships with ``g``, else ``glnn``."""
    return "public" if set(g.masks) == {"train", "val", "test"} else "glnn"


def node_split(g: Graph, split: str | None = None, setting: str = "transductive", split_seed: int = 0,
               held_out: float = 0.2, train_per_class: int = 20, val_per_class: int = 30,
               split_index: int = 0) -> S.Split:
    """The node split :func:`graph_splits` uses (its arguments of the same names); it reads only the
    labels and shipped masks of ``g``, so a loader can check a split before computing features."""
    split = split or default_split(g)
    if split != "public" and split_index:
        raise ConfigError(f"data.args.split_index={split_index} picks a shipped split; it needs data.args.split=public "
                          f"(the split is {split!r})")
    if split == "public":
        check_masks(g.masks, g.num_nodes, g.name)  # shipped masks must not overlap (npz files are checked on read)
        parts = S.public(g, split_index)
    elif split == "glnn":
        parts = S.per_class(g, train_per_class, val_per_class, split_seed)
    else:
        raise ConfigError(f"data.args.split={split!r}; choose from: public, glnn")
    if setting == "inductive":
        parts = S.hold_out(parts, held_out, split_seed)
    elif setting != "transductive":
        raise ConfigError(f"data.args.setting={setting!r}; choose from: transductive, inductive")
    return parts


NORMALIZE = ("auto", "row", "standardize", "none")
_ALIASES = {True: "row", False: "none", "true": "row", "false": "none"}


def normalize_mode(normalize: str | bool) -> str:
    """``normalize`` as one of :data:`NORMALIZE` (``True``/``False`` stand for ``row``/``none``);
    anything else is a :class:`ConfigError` naming ``data.args.normalize``."""
    key = normalize.lower() if isinstance(normalize, str) else normalize
    mode = _ALIASES.get(key, key) if isinstance(key, (str, bool)) else None
    if mode not in NORMALIZE:
        raise ConfigError(f"data.args.normalize={normalize!r}; choose from: {', '.join(NORMALIZE)} "
                          f"(true/false: row/none)")
    return mode


def feature_steps(x: Tensor, normalize: str | bool = "auto", nodes: Tensor | None = None,
                  name: str = "graph") -> list[dict]:
    """The preprocessing steps (:mod:`mmkd.preprocess`) for node features ``x`` under ``normalize``.

    ``auto``: ``row_normalize`` when ``x`` has no negative value (counts, bags of words, binary
    features: Planetoid's row normalisation, unchanged), no step otherwise, since dividing a row of
    embedding features by a sum that may be near zero or negative scrambles it (on a citation graph
    with sentence-embedding features that cost a GCN teacher 13 points and an MLP 27).
    ``standardize``: ``(x - mean) / std`` per feature, the statistics (population std) taken over
    ``nodes`` (default: all), the nodes visible in training. ``row``, ``none``: always / never
    ``row_normalize``. The choice is logged.
    """
    mode = normalize_mode(normalize)
    chosen = mode
    if mode == "auto":
        low = float(x.min())
        chosen = "row" if low >= 0 else "none"
        why = ("every feature is non-negative (counts or bag of words)" if chosen == "row"
               else f"features have negative values (min {low:.3g}: embeddings, not counts)")
        log.info("%s: normalize=auto -> %s: %s", name,
                 "row-normalised" if chosen == "row" else "left as they are", why)
    else:
        log.info("%s: normalize=%s", name, mode)
    if chosen == "row":
        return [{"op": "row_normalize"}]
    if chosen == "standardize":
        seen = x if nodes is None else x[nodes]
        mean, std = seen.mean(0), seen.std(0, correction=0)
        return [{"op": "standardize", "mean": mean.tolist(), "std": std.tolist()}]
    return []


GRAPH_RANGES = {"split_seed": SEED, "split_index": SEED, "held_out": Range(0, 1, low_open=True, high_open=True), "train_per_class": COUNT,
                "val_per_class": COUNT}  # graph_splits' numeric arguments, for every graph data set


def check_args(kwargs: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming any ``data.args`` key that :func:`graph_splits` does not take,
    or a ``normalize`` or ``batching`` it does not know."""
    valid = [p for p in inspect.signature(graph_splits).parameters if p != "g"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ConfigError(f"data.args: unknown argument {unknown[0]!r}; choose from: {', '.join(valid)}")
    if "normalize" in kwargs:
        normalize_mode(kwargs["normalize"])  # before the graph is read (a text graph's features are costly)
    if kwargs.get("batching", "full") not in ("full", "neighbor"):
        raise ConfigError(f"data.args.batching={kwargs['batching']!r}; choose from: full, neighbor")


@DATASETS.register("planetoid", ranges=GRAPH_RANGES)
def planetoid_splits(root: str, name: str = "cora", **kwargs) -> DataSplits:
    """A Planetoid citation graph (Cora, CiteSeer, PubMed) read from ``<root>/planetoid/<Name>/raw``;
    ``kwargs`` go to :func:`graph_splits` (split, setting, batching, ...)."""
    check_args(kwargs)
    return graph_splits(planetoid(Path(root) / "planetoid", name), **kwargs)


def _named(name: str):
    def factory(root: str, **kwargs) -> DataSplits:
        check_args(kwargs)
        return planetoid_splits(root, name, **kwargs)

    factory.__doc__ = f"Planetoid {name} (see ``planetoid``)."
    return DATASETS.register(name, ranges=GRAPH_RANGES)(factory)


for _name in ("cora", "citeseer", "pubmed"):
    _named(_name)


@DATASETS.register("npz", ranges=GRAPH_RANGES)
def npz_splits(root: str, path: str, undirected: bool = True, **kwargs) -> DataSplits:
    """A graph from an ``.npz`` file (see :func:`mmkd.graphs.io.read_npz`); ``path`` is relative to the
    data root unless absolute; ``kwargs`` go to :func:`graph_splits` (default split: the file's
    masks when it ships them, else ``glnn``)."""
    check_args(kwargs)
    return graph_splits(read_npz(Path(root) / path, undirected), **kwargs)
