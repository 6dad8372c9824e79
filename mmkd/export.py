"""Export a trained model for deployment: ONNX and ``torch.export`` (an ExportedProgram ``.pt2``).

Both files are written atomically; the ONNX file is checked against PyTorch with onnxruntime.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mmkd import io


def _dynamic_batch(example: Sequence[Tensor]) -> tuple[dict[int, object], ...]:
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} for _ in example)


def export_program(model: nn.Module, example: Sequence[Tensor], path: str | os.PathLike) -> Path:
    """Save ``torch.export.export(model, example)`` (batch dimension dynamic) to ``path`` (.pt2)."""
    model = model.eval()
    program = torch.export.export(model, tuple(example), dynamic_shapes=_dynamic_batch(example))
    with io.atomic_path(path) as tmp:
        torch.export.save(program, tmp)
    return Path(path)


def export_onnx(model: nn.Module, example: Sequence[Tensor], path: str | os.PathLike,
                input_names: Sequence[str], atol: float = 1e-5) -> Path:
    """Export ``model`` to ONNX (batch dimension dynamic) and check it with onnxruntime.

    Raises ``AssertionError`` if onnxruntime's logits differ from PyTorch's by more than ``atol`` on the
    scale of the logits (see :func:`onnx_max_diff`).
    """
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, tuple(example), input_names=list(input_names),
                                    output_names=["logits"], dynamic_shapes=_dynamic_batch(example),
                                    dynamo=True, verbose=False)
    with io.atomic_path(path) as tmp:
        program.save(str(tmp))
        diff = onnx_max_diff(tmp, model, example, input_names)
    if diff > atol:
        raise AssertionError(f"ONNX export of {type(model).__name__} differs from PyTorch by {diff:.2e} > {atol} "
                             "(relative to the largest logit)")
    return Path(path)


def onnx_max_diff(path: str | os.PathLike, model: nn.Module, example: Sequence[Tensor],
                  input_names: Sequence[str]) -> float:
    """Largest difference between onnxruntime's and PyTorch's outputs on ``example``, divided by
    ``max(1, max |logit|)``: an absolute difference for logits of order one, a relative one for large
    logits, whose float32 rounding alone exceeds 1e-5 (a BatchNorm with small running variance gives
    logits in the hundreds)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: x.detach().cpu().numpy() for name, x in zip(input_names, example)}
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        want = model(*example).detach().cpu().numpy()
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))
