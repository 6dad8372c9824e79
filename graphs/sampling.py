"""Neighbour sampling with ``torch_geometric.loader.NeighborLoader`` semantics, in plain torch.

From a set of seed nodes, hop ``h`` samples up to ``num_neighbors[h]`` incoming neighbours (without
replacement; ``-1``: all of them) of every node first reached at hop ``h - 1``, and keeps the edges
``neighbour -> node`` it sampled. The subgraph's nodes are numbered seeds first (in the given order),
then the nodes reached at hop 1, hop 2, ...: the first ``len(seeds)`` outputs of a GNN on it belong to
the seeds. (PyG's own sampler needs ``pyg-lib`` or ``torch-sparse``; this one needs neither.)
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class CSC:
    """Incoming edges grouped by target: the in-neighbours of ``v`` are ``src[ptr[v]:ptr[v + 1]]``."""

    def __init__(self, edge_index: Tensor, num_nodes: int):
        order = torch.argsort(edge_index[1], stable=True)
        self.src = edge_index[0, order]
        self.ptr = torch.zeros(num_nodes + 1, dtype=torch.long)
        self.ptr[1:] = torch.bincount(edge_index[1], minlength=num_nodes).cumsum(0)
        self.num_nodes = num_nodes


def sample(csc: CSC, seeds: Tensor, num_neighbors: Sequence[int],
           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Sample the neighbourhood of ``seeds``.

    Returns ``(nodes, edge_index)``: the subgraph's node ids in the full graph (seeds first) and its
    edges in the subgraph's numbering.
    """
    local = torch.full((csc.num_nodes,), -1, dtype=torch.long)
    local[seeds] = torch.arange(len(seeds))
    nodes, frontier, src_all, dst_all = [seeds], seeds, [], []
    count = len(seeds)
    for k in num_neighbors:
        start, deg = csc.ptr[frontier], csc.ptr[frontier + 1] - csc.ptr[frontier]
        seg = torch.repeat_interleave(torch.arange(len(frontier)), deg)  # which frontier node, per candidate
        first = torch.repeat_interleave(deg.cumsum(0) - deg, deg)
        pos = start[seg] + torch.arange(len(seg)) - first
        if k >= 0 and len(seg):
            # a random order within each node's neighbours, then the first k of them
            order = torch.argsort(seg.double() + torch.rand(len(seg), generator=generator, dtype=torch.float64))
            seg, pos = seg[order], pos[order]
            keep = torch.arange(len(seg)) - first < k
            seg, pos = seg[keep], pos[keep]
        src, dst = csc.src[pos], frontier[seg]
        new = torch.unique(src[local[src] < 0])
        local[new] = torch.arange(count, count + len(new))
        count += len(new)
        nodes.append(new)
        src_all.append(src)
        dst_all.append(dst)
        frontier = new
    if not src_all:
        return seeds, torch.empty(2, 0, dtype=torch.long)
    src, dst = torch.cat(src_all), torch.cat(dst_all)
    return torch.cat(nodes), torch.stack([local[src], local[dst]])
