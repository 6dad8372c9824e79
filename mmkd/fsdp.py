"""Fully sharded data parallel training (``trainer.strategy=fsdp`` under ``torchrun``), with torch's FSDP2.

What a fit trains is sharded across the processes, the rest stays as it is:

- every trainable :class:`~mmkd.net.Net` of the fitted module (the student; a co-trained teacher) is
  trained as a sharded twin: a copy on the device, each of its transformer blocks (the classes a
  Hugging Face model lists in ``_no_split_modules``) and then the whole ``Net`` wrapped with
  ``fully_shard``, so a process holds ``1/world`` of its parameters, gradients and optimizer state and
  gathers a block's weights only while it runs. The original waits on the CPU and receives the trained
  weights when the fit ends (:func:`sharded`), so evaluation, saving and export see an ordinary module.
- frozen teachers are not sharded: each process keeps its copy (or, better, reads them from the
  teacher cache, which holds no weights at all);
- any other trainable parameter (a router's, an adapter's, a loss term's module) is replicated: its
  gradients are averaged over the processes after every backward (:func:`average_gradients`).

Every process starts from rank 0's weights (they are broadcast before sharding). Checkpoints hold full,
unsharded state dicts (``torch.distributed.checkpoint.state_dict``), so a run saved under FSDP resumes
or loads anywhere. Multi-node: ``torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d
--rdzv-endpoint HOST:PORT -m mmkd.cli run ... trainer.strategy=fsdp`` on every node.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from mmkd.net import Net, Teacher


def units(module: nn.Module) -> list[tuple[nn.Module, str, Net]]:
    """``(parent, name, net)`` for every trainable :class:`~mmkd.net.Net` in ``module`` (outermost ones)."""
    out = []

    def walk(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, Net) and not (isinstance(child, Teacher) and child.frozen):
                out.append((parent, name, child))
            else:
                walk(child)
    if isinstance(module, Net):
        raise ValueError("trainer.strategy=fsdp shards the Nets inside the fitted module; fit a Distiller")
    walk(module)
    return out


def _blocks(net: nn.Module) -> set[str]:
    """Class names of the blocks to shard one by one: those the Hugging Face models inside list."""
    return {n for m in net.modules() for n in (getattr(m, "_no_split_modules", None) or ())}


@contextmanager
def sharded(module: nn.Module, device: torch.device) -> Iterator[list[nn.Parameter]]:
    """Within the block, ``module``'s trainable Nets are sharded twins (see the module docstring); yields
    the replicated trainable parameters (those :func:`average_gradients` averages). On exit each
    original Net gets its twin's full weights back (a collective call: every process must exit)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, 0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    swaps = []
    for parent, name, net in units(module):
        twin = copy.deepcopy(net).to(device)
        blocks = _blocks(twin)
        for m in list(twin.modules()):
            if m is not twin and type(m).__name__ in blocks:
                fully_shard(m, mesh=mesh)
        fully_shard(twin, mesh=mesh)
        net.to("cpu")
        parent._modules[name] = twin
        swaps.append((parent, name, net, twin))
    inside = {id(p) for *_, twin in swaps for p in twin.parameters()}
    try:
        yield [p for p in module.parameters() if p.requires_grad and id(p) not in inside]
    finally:
        for parent, name, net, twin in swaps:
            full = get_model_state_dict(twin, options=StateDictOptions(full_state_dict=True))
            net.load_state_dict(full)
            parent._modules[name] = net.to(device)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of replicated ``params`` over the processes (what DDP does for them)."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def full_state(module: nn.Module, opt: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """The full (unsharded) state dicts of ``module`` and ``opt``, on the CPU (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if opt is None:
        return get_model_state_dict(module, options=options), None
    return get_state_dict(module, opt, options=options)


def load_full_state(module: nn.Module, model: dict, opt: torch.optim.Optimizer | None = None,
                    optim: dict | None = None) -> None:
    """Load full state dicts (as :func:`full_state` returns them) into a sharded ``module`` and ``opt``."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, model, options=options)
    if opt is not None:
        set_optimizer_state_dict(module, opt, optim, options=options)


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The total gradient norm over sharded (DTensor) and replicated parameters alike."""
    from torch.distributed.tensor import DTensor

    norms = [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def clip(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their total norm is at most ``max_norm``; return the norm before."""
    norm = grad_norm(params)
    coef = float((max_norm / (norm + 1e-6)).clamp(max=1.0))
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)
    return norm
