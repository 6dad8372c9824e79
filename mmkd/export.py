"""Export a trained model for deployment: ONNX and ``torch.export`` (an ExportedProgram ``.pt2``).

Both files are written atomically; the ONNX file is checked against PyTorch with onnxruntime.
:func:`export_student` exports the student of a finished run, with example inputs that follow each
input's dtype and range as its ``data.json`` records them (:func:`example_inputs`).
"""
from __future__ import annotations

import inspect
import os
import sys
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mmkd import io
from mmkd.build import build_model, load_weights
from mmkd.config import EXPORT_FORMATS, ConfigError, import_modules

EXAMPLE_BATCH = 2  # rows of the example inputs an export traces with (the batch dimension stays dynamic)


def _dynamic_batch(model: nn.Module, example: Sequence[Tensor]) -> tuple:
    """Dimension 0 of every input dynamic, in the structure ``torch.export`` binds ``example`` to
    ``model.forward``: inputs beyond its named parameters go, as one tuple, to its ``*args``
    (``Fusion.forward(*xs)``, ``DualHead.forward(x, *more)``)."""
    batch = torch.export.Dim("batch", min=1)
    specs = [{0: batch} for _ in example]
    params = inspect.signature(model.forward).parameters.values()
    named = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    if any(p.kind == p.VAR_POSITIONAL for p in params) and len(specs) > named:
        return (*specs[:named], tuple(specs[named:]))
    return tuple(specs)


def export_program(model: nn.Module, example: Sequence[Tensor], path: str | os.PathLike) -> Path:
    """Save ``torch.export.export(model, example)`` (batch dimension dynamic) to ``path`` (.pt2)."""
    model = model.eval()
    program = torch.export.export(model, tuple(example), dynamic_shapes=_dynamic_batch(model, example))
    with io.atomic_path(path) as tmp:
        torch.export.save(program, tmp)
    return Path(path)


def export_onnx(model: nn.Module, example: Sequence[Tensor], path: str | os.PathLike,
                input_names: Sequence[str], atol: float = 1e-5) -> Path:
    """Export ``model`` to ONNX (batch dimension dynamic) and check it with onnxruntime.

    Raises ``AssertionError`` (and writes nothing) if onnxruntime's logits differ from PyTorch's by more
    than ``atol`` on the scale of the logits, or either holds NaN or infinite values (see :func:`onnx_max_diff`).
    """
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, tuple(example), input_names=list(input_names),
                                    output_names=["logits"], dynamic_shapes=_dynamic_batch(model, example),
                                    dynamo=True, verbose=False)
    with io.atomic_path(path) as tmp:
        program.save(str(tmp))
        diff = onnx_max_diff(tmp, model, example, input_names)
        if not diff <= atol:  # raised inside the block: the file is not written
            raise AssertionError(f"ONNX export of {type(model).__name__} differs from PyTorch by {diff:.2e} > {atol} "
                                 "(relative to the largest logit; inf: an output holds NaN or infinite values)")
    return Path(path)


def onnx_max_diff(path: str | os.PathLike, model: nn.Module, example: Sequence[Tensor],
                  input_names: Sequence[str]) -> float:
    """Largest difference between onnxruntime's and PyTorch's outputs on ``example``, divided by
    ``max(1, max |logit|)``: an absolute difference for logits of order one, a relative one for large
    logits, whose float32 rounding alone exceeds 1e-5 (a BatchNorm with small running variance gives
    logits in the hundreds). NaN or infinite outputs (from either) give ``inf``: the check fails."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: x.detach().cpu().numpy() for name, x in zip(input_names, example)}
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        want = model(*example).detach().cpu().numpy()
    if got.shape != want.shape or not (np.isfinite(got).all() and np.isfinite(want).all()):
        return float("inf")
    if not want.size:
        return 0.0
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def example_inputs(meta: Mapping, keys: Sequence[str], batch: int = EXAMPLE_BATCH, seed: int = 0) -> list[Tensor]:
    """Example inputs ``[batch, *shape]`` for ``keys`` of the data set described by ``meta`` (a run's
    ``data.json``), drawn with ``seed``, following ``meta["inputs"][key]`` (dtype, min, max):

    - integers in ``[min, max]`` (token ids within the range seen in the data, so below the vocabulary
      size); a 0/1 range (an attention mask) gives masks of ones then zeros, row ``i`` keeping
      ``length - i * length // batch`` positions (at least one), so padding is traced too;
    - booleans likewise, as masks;
    - floats (and keys ``meta`` says nothing about: run directories written before dtypes were
      recorded) uniform in ``[0, 1)``, as before.
    """
    g = torch.Generator().manual_seed(seed)
    info = meta.get("inputs") or {}
    out = []
    for k in keys:
        shape = tuple(int(d) for d in meta["shapes"][k])
        spec = info.get(k) or {}
        dtype = getattr(torch, str(spec.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype) or dtype.is_floating_point or dtype.is_complex:
            out.append(torch.rand(batch, *shape, generator=g))
            continue
        lo, hi = int(spec.get("min") or 0), int(spec.get("max") or 0)
        if dtype == torch.bool or (lo, hi) == (0, 1):
            out.append(_masks(batch, shape, g).to(dtype))
        else:
            out.append(torch.randint(lo, max(lo, hi) + 1, (batch, *shape), generator=g, dtype=torch.int64).to(dtype))
    return out


def _masks(batch: int, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    """0/1 masks ``[batch, *shape]``: ones then zeros along a 1-D item (a padded sequence), random 0/1
    with the first entry 1 otherwise."""
    if len(shape) == 1:
        n = shape[0]
        lengths = torch.tensor([max(1, n - i * n // batch) for i in range(batch)])
        return (torch.arange(n) < lengths[:, None]).long()
    mask = torch.randint(0, 2, (batch, *shape), generator=g)
    mask.view(batch, -1)[:, :1] = 1
    return mask


def _reads_graph(model: nn.Module, keys: Sequence[str]) -> bool:
    """Whether ``model`` reads a whole graph (an ``edge_index`` input, or PyG message passing)."""
    if "edge_index" in keys:
        return True
    message_passing = getattr(sys.modules.get("torch_geometric.nn"), "MessagePassing", None)
    return message_passing is not None and any(isinstance(m, message_passing) for m in model.modules())


def trained_student(run_dir: str | os.PathLike):
    """The student of the finished run in ``run_dir``, its config and its ``data.json``: built from the
    run's config (its ``imports`` imported first), loaded from ``student.pt``, in eval mode. A missing file is a :class:`~mmkd.config.ConfigError` naming it."""
    return trained_model(run_dir)


def finished_run(run_dir: str | os.PathLike, teacher: str | None = None, key: str = "run_dir",
                 teacher_key: str = "teacher"):
    """The config of the finished run in ``run_dir`` that has a trained student (``teacher=None``) or
    teacher ``teacher``; a missing file or an unknown teacher is a :class:`~mmkd.config.ConfigError`
    naming the file and the config key that gave it (``key``, ``teacher_key``). Reads the config alone
    (a check before anything is loaded)."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    weights = "student.pt" if teacher is None else f"teachers/{teacher}/best.pt"
    if (run_dir / "config.yaml").is_file() and teacher is not None:
        teachers = OmegaConf.load(run_dir / "config.yaml").get("teachers", {})
        if teacher not in teachers:
            raise ConfigError(f"{teacher_key}: the run in {str(run_dir)!r} has no teacher {teacher!r}; its teachers: "
                              f"{', '.join(teachers) or 'none'}")
    for needed in ("config.yaml", "data.json", weights):
        if not (run_dir / needed).exists():
            raise ConfigError(f"{key}: {str(run_dir)!r} has no {needed}; give the directory of a finished run")
    return OmegaConf.load(run_dir / "config.yaml")


def trained_model(run_dir: str | os.PathLike, teacher: str | None = None):
    """The student (``teacher=None``) or the teacher ``teacher`` of the run in ``run_dir``, its config
    and its ``data.json``, in eval mode: built from the run's config (its ``imports`` imported first) and
    loaded from ``student.pt`` or ``teachers/<teacher>/best.pt``. A missing file or an unknown teacher is a
    :class:`~mmkd.config.ConfigError` naming it (:func:`finished_run`)."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    cfg = finished_run(run_dir, teacher)
    import_modules(cfg.get("imports", []))
    meta = OmegaConf.to_container(OmegaConf.load(run_dir / "data.json"))
    if teacher is None:
        model = build_model(cfg.student, meta, "student")
        model.load_state_dict(io.load(run_dir / "student.pt", "the student's weights", "rerun the experiment"))
    else:
        model = build_model(cfg.teachers[teacher], meta, f"teachers.{teacher}")
        load_weights(model, str(run_dir / "teachers" / teacher / "best.pt"), f"teachers.{teacher}")
    return model.eval(), cfg, meta


def export_student(run_dir: str | os.PathLike, formats: Sequence[str]) -> list[Path]:
    """Export the student of a finished run to ``<run_dir>/export/``: ``student.onnx`` (``onnx``)
    and/or ``student.pt2`` (``pt2``, alias ``torchscript``: a ``torch.export`` program), plus ``meta.json``: the
    input shapes and dtypes, the class names and the data set's feature preprocessing (what
    ``mmkd predict`` applies to raw inputs).

    The example inputs follow the dtypes and ranges in the run's ``data.json`` (:func:`example_inputs`).
    A student that reads a whole graph (a GNN: ``x`` and ``edge_index``) is not exported: deployment
    serves graph-free students (an MLP distilled from the GNN); that, an unknown format or an
    unfinished run is a :class:`~mmkd.config.ConfigError`, raised before anything is written.
    """
    run_dir = Path(run_dir)
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"format: unknown export format {fmt!r}; choose from: {', '.join(EXPORT_FORMATS)}")
    student, cfg, meta = trained_student(run_dir)
    keys = list(cfg.student.inputs)
    if _reads_graph(student, keys):
        raise ConfigError(f"student: {cfg.student.name} reads a whole graph (inputs {', '.join(keys)}), which an "
                          "export cannot serve without the graph; distil it into an MLP on node features "
                          "(e.g. experiment=g2m_glnn) and export that")
    example = example_inputs(meta, keys)
    out = run_dir / "export"
    paths = []
    for fmt in formats:
        try:
            if fmt == "onnx":
                paths.append(export_onnx(student, example, out / "student.onnx", keys))
            else:  # pt2 / torchscript: torch.jit is deprecated; TorchScript's successor is torch.export
                paths.append(export_program(student, example, out / "student.pt2"))
        except AssertionError:  # the ONNX check: a bug, not the example's dtypes
            raise
        except Exception as e:
            if meta.get("inputs"):
                raise
            raise ConfigError(f"run_dir: {str(run_dir / 'data.json')!r} records no input dtypes (written by an "
                              f"older mmkd), so {cfg.student.name} was exported with float example inputs and "
                              f"failed ({io.first_line(e, typed=False)}); rerun the experiment, or add to data.json "
                              '"inputs": {"<key>": {"dtype": "int64", "min": 0, "max": <largest id>}, ...}') from e
    preprocessing = meta.get("preprocessing") or {}
    io.write_json({"inputs": {k: meta["shapes"][k] for k in keys},
                   "dtypes": {k: str(x.dtype).removeprefix("torch.") for k, x in zip(keys, example)},
                   "class_names": meta["class_names"], "num_classes": meta["num_classes"], "model": cfg.student.name,
                   "preprocessing": {k: preprocessing[k] for k in keys if k in preprocessing},
                   "text_inputs": {n: s for n, s in (meta.get("text_inputs") or {}).items()
                                   if set(s.get("keys", [])) & set(keys)}}, out / "meta.json")
    return paths
