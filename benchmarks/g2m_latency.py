"""Inference latency and peak memory of the exported MLP student (onnxruntime and PyTorch) against
its GNN teachers (GCN and GraphSAGE), neighbour aggregation included, on Cora and on a generated graph.

Two workloads, after GLNN (Zhang et al., ICLR 2022, whose abstract reports 146-273x faster inference):
- ``10 nodes``: predict 10 random nodes. The MLP reads their 10 feature rows; a 2-layer GNN must first
  fetch their 2-hop neighbourhood (every neighbour, through a CSC index built once), gather its
  features and run on that subgraph. A different set of nodes every call.
- ``all nodes``: predict every node. The GNN runs on the whole graph with a sparse CSR adjacency
  (PyG's SpMM path: no per-edge message tensor, the lightest way to aggregate); GCN caches its
  normalised adjacency after the first call (PyG's ``cached=True``), as a deployed GCN on a fixed
  graph would.

Models: 2-layer GCN and SAGE of hidden width ``--hidden`` (128) and an MLP of hidden widths
``--mlp-hidden`` (256, wider than the teacher, as GLNN's students), untrained (time and memory do not
depend on the weight values); the MLP is exported with ``mmkd.export``
(checked against PyTorch to 1e-5). Every configuration runs in its own process with one thread.
Speed-ups divide medians. Peak memory is the growth of the resident set during a call (``VmHWM``
after, reset through ``/proc/self/clear_refs``, minus ``VmRSS`` before; inputs and weights already in
memory are not counted), measured after the timed calls with caching allocators out of the way
(glibc maps blocks of 64 KiB and more on their own and returns them when freed; onnxruntime's arena is
off), so each call's working memory shows instead of being served from memory kept by the previous
call. The generated graph (default 1,000,000 nodes, uniform random edges of average degree 10 made
undirected, 100 standard-normal float32 features) is built in each process from a fixed seed.

    python benchmarks/g2m_latency.py [--repeats 100] [--cora-repeats 20] [--large-repeats 5] [--nodes 1000000]
                                     [--degree 10] [--features 100] [--hidden 128] [--mlp-hidden 256] [--skip-large]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import fmt, write

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mlp-onnx", "mlp-torch", "gcn", "sage")
LABELS = {"mlp-onnx": "MLP, onnxruntime", "mlp-torch": "MLP, PyTorch", "gcn": "GCN (PyG)", "sage": "GraphSAGE (PyG)"}


def status_kb(key: str) -> int:
    """A memory figure (kB) from ``/proc/self/status``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> None:
    """Reset ``VmHWM`` (the resident-set high-water mark) to the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def release_freed_memory() -> None:
    """Make glibc map blocks of 64 KiB and more on their own and unmap them (and trim the heap) when
    freed, so that a call's peak is visible in the resident set; free what is garbage now."""
    import ctypes
    import gc

    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_trim_threshold, 0)
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.malloc_trim(0)


def random_graph(n: int, degree: float, features: int, seed: int = 0):
    """``n`` nodes, ``n * degree / 2`` uniform random pairs made undirected (no self-loops, duplicates
    merged: average degree about ``degree``), standard-normal float32 features, 7 random classes."""
    from mmkd.graphs.data import to_undirected

    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, n, (2, int(n * degree / 2)), generator=g)
    pairs = pairs[:, pairs[0] != pairs[1]]
    x = torch.randn(n, features, generator=g)
    return x, to_undirected(pairs, n), 7


def cora():
    """Cora's row-normalised features and its edges, from the data root (``$MMKD_DATA``)."""
    from mmkd.graphs.io import planetoid
    from mmkd.preprocess import row_normalize

    g = planetoid(Path(os.environ.get("MMKD_DATA", ROOT / "data")) / "planetoid", "cora")
    return row_normalize(g.x), g.edge_index, g.num_classes


class CSC:
    """In-neighbours grouped by target (built once, like a graph store): ``src[ptr[v]:ptr[v + 1]]``."""

    def __init__(self, edge_index: torch.Tensor, n: int):
        order = torch.argsort(edge_index[1], stable=True)
        self.src = edge_index[0, order]
        self.ptr = torch.zeros(n + 1, dtype=torch.long)
        self.ptr[1:] = torch.bincount(edge_index[1], minlength=n).cumsum(0)

    def khop(self, seeds: torch.Tensor, hops: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``hops``-hop in-neighbourhood of ``seeds``: its nodes (seeds first) and the edges
        ``neighbour -> node`` of every node reached before the last hop, numbered locally. A
        ``hops``-layer GNN gives the seeds the outputs it gives them on the whole graph (exactly for
        mean aggregation; GCN's degree normalisation sees the subgraph's degrees at its border)."""
        nodes, frontier, src_all, dst_all = seeds, seeds, [], []
        for _ in range(hops):
            deg = self.ptr[frontier + 1] - self.ptr[frontier]
            first = torch.repeat_interleave(self.ptr[frontier] - (deg.cumsum(0) - deg), deg)
            src = self.src[first + torch.arange(int(deg.sum()))]
            src_all.append(src)
            dst_all.append(torch.repeat_interleave(frontier, deg))
            new = torch.unique(src)
            frontier = new[~torch.isin(new, nodes)]
            nodes = torch.cat([nodes, frontier])
        ids, pos = torch.sort(nodes)
        local = lambda v: pos[torch.searchsorted(ids, v)]  # noqa: E731
        return nodes, torch.stack([local(torch.cat(src_all)), local(torch.cat(dst_all))])


def build(name: str, graph: str, nodes: int, degree: float, features: int, hidden: int, mlp_hidden: list[int]):
    """The number of nodes and ``run(ids)``: ``name``'s logits for nodes ``ids`` (``None``: all), plus,
    for the onnxruntime MLP, the same function without the memory arena (else ``None``)."""
    from torch_geometric.utils import to_torch_csr_tensor

    from mmkd.export import export_onnx
    from mmkd.registry import MODELS as REGISTRY

    x, edge_index, classes = cora() if graph == "cora" else random_graph(nodes, degree, features)
    n, f = x.shape
    torch.manual_seed(0)
    if name.startswith("mlp"):
        mlp = REGISTRY["mlp"](num_classes=classes, in_shape=(f,), hidden=mlp_hidden).eval()
        if name == "mlp-torch":
            def run(ids):
                with torch.no_grad():
                    return mlp(x if ids is None else x[ids])
            return n, run, None
        import onnxruntime as ort

        path = Path(tempfile.mkdtemp()) / "mlp.onnx"
        export_onnx(mlp, [x[:2]], path, ["x"])
        xn = x.numpy()

        def session_run(arena: bool):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            opts.enable_cpu_mem_arena = opts.enable_mem_pattern = arena
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            return lambda ids: session.run(None, {"x": xn if ids is None else xn[ids.numpy()]})[0]

        return n, session_run(True), session_run(False)
    gnn = REGISTRY[name](num_classes=classes, in_shape=(f,), hidden=hidden).eval()
    layers = len(gnn.convs)
    adj_t = to_torch_csr_tensor(edge_index.flip(0), size=(n, n))  # rows are targets
    csc = CSC(edge_index, n)
    del edge_index
    whole = copy.deepcopy(gnn)  # the same weights; on the fixed whole graph GCN may cache its normalisation
    for conv in whole.convs:
        if hasattr(conv, "cached"):
            conv.cached = True

    def run(ids):
        with torch.no_grad():
            if ids is None:
                return whole(x, adj_t)
            sub, edges = csc.khop(ids, layers)
            return gnn(x[sub], edges)[:len(ids)]

    if name == "sage" and graph == "cora":  # the neighbourhood gives the seeds their full-graph outputs
        ids = torch.randperm(n)[:10]
        torch.testing.assert_close(run(ids), run(None)[ids], atol=1e-5, rtol=1e-4)
    return n, run, None


def worker(spec: dict) -> dict:
    """Time ``spec['model']`` on ``spec['graph']``, both workloads; runs in its own process."""
    torch.set_num_threads(1)
    n, run, run_no_arena = build(spec["model"], spec["graph"], spec["nodes"], spec["degree"], spec["features"],
                                 spec["hidden"], spec["mlp_hidden"])
    gen = torch.Generator().manual_seed(1)
    draws = {"10": lambda: torch.randperm(n, generator=gen)[:10], "all": lambda: None}
    repeats = {"10": spec["repeats_10"], "all": spec["repeats_all"]}
    out = {}
    for workload, draw in draws.items():
        run(draw())  # warm-up
        ms = []
        for _ in range(repeats[workload]):
            ids = draw()
            t0 = time.perf_counter()
            run(ids)
            ms.append(1000 * (time.perf_counter() - t0))
        out[workload] = {"ms": ms}
    run = run_no_arena or run
    for workload, draw in draws.items():
        release_freed_memory()
        run(draw())
        mb = []
        for _ in range(2):
            ids = draw()
            release_freed_memory()
            rss = status_kb("VmRSS")
            reset_peak()
            run(ids)
            mb.append((status_kb("VmHWM") - rss) / 1024)
        out[workload]["peak_mb"] = mb
    return out


def peak(fn):
    """``fn()``, its seconds and the growth of the resident set during it (MB, see :func:`worker`)."""
    release_freed_memory()
    rss = status_kb("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, (status_kb("VmHWM") - rss) / 1024


def train_worker(spec: dict) -> dict:
    """Training cost on ``spec['graph']`` (``cora``, ``pubmed`` or ``csbm``): the SAGE teacher on
    neighbour-sampled mini-batches of its labelled nodes, its inference on every node (whole graph,
    CSR adjacency), and the MLP student full-batch on every node with the teacher's soft labels."""
    torch.set_num_threads(1)
    from mmkd import Distiller, Net, Teacher, TensorDictDataset, Term, Trainer
    from mmkd.cache import CachedTeacher
    from mmkd.graphs import splits as S
    from mmkd.graphs.datasets import NeighborGraph, masked
    from mmkd.graphs.io import planetoid
    from mmkd.graphs.synthetic import csbm
    from mmkd.registry import MODELS as REGISTRY
    from mmkd.routers import ConstantRouter
    from torch_geometric.utils import to_torch_csr_tensor

    if spec["graph"] == "csbm":
        g = csbm(spec["nodes"], spec["classes"], spec["degree"], 0.8, spec["features"], 0.3)
        from mmkd.graphs.data import to_undirected
        g.edge_index = to_undirected(g.edge_index, g.num_nodes)
    else:
        g = planetoid(Path(os.environ.get("MMKD_DATA", ROOT / "data")) / "planetoid", spec["graph"])
    parts = S.per_class(g, 20, 30, 0)
    n, c = g.num_nodes, g.num_classes
    quiet = dict(tensorboard=False, progress="off", scheduler="none", optimizer="adam", lr=0.01)
    torch.manual_seed(0)
    sage = REGISTRY["sage"](num_classes=c, in_shape=(g.x.shape[1],), hidden=spec["hidden"], dropout=0.0)
    train = NeighborGraph("t/train", g.x, g.edge_index, masked(g.y, parts.train), parts.train, spec["fanout"])
    val = NeighborGraph("t/val", g.x, g.edge_index, masked(g.y, parts.val), parts.val, [-1] * len(spec["fanout"]))
    out_dir = tempfile.mkdtemp()
    teacher = Distiller(Net(sage, ["x", "edge_index"]), [], [Term("ce")])
    fit, _, teacher_mb = peak(lambda: Trainer(run_dir=f"{out_dir}/t", max_epochs=spec["epochs"], batch_size=512,
                                              **quiet).fit(teacher, train, val))
    adj_t = to_torch_csr_tensor(g.edge_index.flip(0), size=(n, n))
    with torch.no_grad():
        logits, infer_s, infer_mb = peak(lambda: sage.eval()(g.x, adj_t))
    mlp = REGISTRY["mlp"](num_classes=c, in_shape=(g.x.shape[1],), hidden=spec["mlp_hidden"])
    nodes = TensorDictDataset("s/train", x=g.x, label=masked(g.y, parts.train))
    cached = CachedTeacher(Teacher(sage, ["x", "edge_index"]), logits, {}, Path(out_dir))
    student = Distiller(Net(mlp, ["x"]), [cached], [Term("ce"), Term("kd", args={"temperature": 1.0})], ConstantRouter())
    sfit, _, student_mb = peak(lambda: Trainer(run_dir=f"{out_dir}/s", max_epochs=spec["epochs"], batch_size=n,
                                               **quiet).fit(student, nodes, TensorDictDataset(
                                                   "s/val", x=g.x[parts.val], label=g.y[parts.val])))
    return {"nodes": n, "edges": g.edge_index.shape[1], "classes": c,
            "teacher_epoch_s": [h["time/train_s"] for h in fit.history], "teacher_peak_mb": teacher_mb,
            "inference_s": infer_s, "inference_peak_mb": infer_mb,
            "student_epoch_s": [h["time/train_s"] for h in sfit.history], "student_peak_mb": student_mb}


def measure(spec: dict, flag: str = "--worker") -> dict:
    """Run :func:`worker` (or, with ``--train-worker``, :func:`train_worker`) for ``spec`` in a fresh
    process (so peaks do not mix)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, flag, json.dumps(spec)], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).parent)
    if proc.returncode:
        raise RuntimeError(f"{spec}: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=100, help="timed repeats of the 10-node workload")
    p.add_argument("--cora-repeats", type=int, default=20, help="timed repeats of all of Cora's nodes")
    p.add_argument("--large-repeats", type=int, default=5, help="timed repeats of all of the large graph's nodes")
    p.add_argument("--nodes", type=int, default=1_000_000)
    p.add_argument("--degree", type=float, default=10.0)
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--hidden", type=int, default=128, help="GNN hidden width")
    p.add_argument("--mlp-hidden", type=int, nargs="+", default=[256], help="MLP hidden widths")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--train", action="store_true", help="training cost instead of inference: teacher on sampled "
                   "neighbourhoods, student full-batch (Cora, PubMed when present, CSBM graphs of --train-nodes)")
    p.add_argument("--train-nodes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--epochs", type=int, default=3, help="training epochs timed (--train)")
    p.add_argument("--fanout", type=int, nargs="+", default=[5, 5], help="neighbours sampled a hop (--train; GLNN's)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--train-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.train_worker:
        print(json.dumps(train_worker(json.loads(args.train_worker))))
        return
    if args.train:
        train_main(args)
        return
    graphs = ["cora"] + ([] if args.skip_large else [f"random{args.nodes}"])
    results: dict = {}
    load = [os.getloadavg()[0]]
    for graph in graphs:
        for model in MODELS:
            spec = {"graph": "cora" if graph == "cora" else "random", "model": model, "nodes": args.nodes,
                    "degree": args.degree, "features": args.features, "hidden": args.hidden,
                    "mlp_hidden": args.mlp_hidden, "repeats_10": args.repeats,
                    "repeats_all": args.cora_repeats if graph == "cora" else args.large_repeats}
            t0 = time.perf_counter()
            results.setdefault(graph, {})[model] = measure(spec)
            print(f"{graph} {model}: {time.perf_counter() - t0:.1f} s", flush=True)
            load.append(os.getloadavg()[0])
    report({"args": {k: v for k, v in vars(args).items() if k != "worker"}, "load_average": load,
            "results": results})


def report(data: dict) -> None:
    """Write the JSON and the markdown table of a run's ``data`` (``args``, ``load_average``, ``results``).

    Speed-ups compare medians: on a shared machine a few slow outliers move a mean of sub-millisecond
    calls far more than the typical call."""
    args, load = data["args"], data["load_average"]
    torch.set_num_threads(1)  # the workers' setting, which the table's machine line records
    header = ["graph", "nodes predicted", "model", "latency ms, mean ± std", "median ms", "peak memory MB",
              "÷ MLP onnxruntime", "÷ MLP PyTorch"]
    rows = []
    for graph, by_model in data["results"].items():
        for workload in ("10", "all"):
            median = {m: statistics.median(by_model[m][workload]["ms"]) for m in MODELS}
            for model in MODELS:
                r = by_model[model][workload]
                rows.append([graph, workload, LABELS[model], fmt(r["ms"], 1, 3), f"{median[model]:.3f}",
                             fmt(r["peak_mb"], 1, 1), f"{median[model] / median['mlp-onnx']:.1f}x",
                             f"{median[model] / median['mlp-torch']:.1f}x"])
    large = f"random{args['nodes']}"
    has_large = large in data["results"]
    notes = (f"Latency over {args['repeats']} calls for 10 nodes (new random nodes each call), "
             f"{args['cora_repeats']} for all of Cora" + (f", {args['large_repeats']} for all of {large}" if has_large else "")
             + "; peak memory over 2 calls. One thread per model, each in its own process. The machine is shared "
             f"(1-minute load average {min(load):.1f} to {max(load):.1f} on {os.cpu_count()} cores during the run), "
             "so latencies carry noise. "
             + (f"{large}: {args['nodes']:,} nodes, average degree about {args['degree']:g}, {args['features']} "
                "features. " if has_large else "")
             + f"GNNs: 2 layers of width {args['hidden']}; MLP hidden widths {args['mlp_hidden']}. "
             "The last two columns divide the model's median latency by the MLP's (the MLP's speed-up). "
             "GLNN reports 146-273x (SAGE against MLP) for 10 nodes.")
    write("g2m_latency", data, header, rows, notes)

def train_main(args) -> None:
    """Training cost per graph, each in its own process; writes ``g2m_latency_train``."""
    root = Path(os.environ.get("MMKD_DATA", ROOT / "data")) / "planetoid"
    graphs = [("cora", 0), *(("pubmed", 0),) * (root / "PubMed" / "raw").is_dir(), *(("csbm", k) for k in args.train_nodes)]
    skipped = [] if (root / "PubMed" / "raw").is_dir() else [f"pubmed (no {root / 'PubMed' / 'raw'})"]
    results, rows = {}, []
    for graph, nodes in graphs:
        spec = {"graph": graph, "nodes": nodes, "classes": 5, "degree": args.degree, "features": args.features,
                "hidden": args.hidden, "mlp_hidden": args.mlp_hidden, "epochs": args.epochs, "fanout": args.fanout}
        t0 = time.perf_counter()
        r = results[f"{graph}{nodes or ''}"] = measure(spec, "--train-worker")
        print(f"{graph} {nodes or ''}: {time.perf_counter() - t0:.1f} s", flush=True)
        later = lambda xs: xs[1:] or xs  # noqa: E731  (the first epoch also warms up)
        rows.append([f"{graph}" + (f" ({r['nodes']:,} nodes)" if graph == "csbm" else ""), f"{r['edges']:,}",
                     fmt(later(r["teacher_epoch_s"]), 1, 3), f"{r['teacher_peak_mb']:.0f}", f"{r['inference_s']:.2f}",
                     f"{r['inference_peak_mb']:.0f}", fmt(later(r["student_epoch_s"]), 1, 3), f"{r['student_peak_mb']:.0f}"])
    notes = (f"Seconds per training epoch (mean ± std over epochs 2-{args.epochs}) and peak memory (growth of the "
             f"resident set during the whole fit, MB), one thread. Teacher: 2-layer GraphSAGE of width {args.hidden} on "
             f"neighbour-sampled mini-batches (fan-out {args.fanout}, 512 seeds a batch) of its labelled nodes (GLNN's "
             f"split: 20 a class), evaluated each epoch on its 30-a-class validation nodes with their full neighbourhoods. "
             f"Inference: the teacher on every node at once (CSR adjacency), the soft labels the student learns from. "
             f"Student: MLP {args.mlp_hidden} on every node in one full batch (CE on the labelled nodes + KL to the "
             f"soft labels on all). CSBM: generated, 5 classes, mean degree about {args.degree:g}, homophily 0.8, "
             f"{args.features} features." + "".join(f" Skipped {s}." for s in skipped))
    write("g2m_latency_train", {"args": {k: v for k, v in vars(args).items() if "worker" not in k},
                                "skipped": skipped, "results": results},
          ["graph", "directed edges", "teacher s / epoch", "teacher peak MB", "inference s (all nodes)", "inference peak MB",
           "student s / epoch", "student peak MB"], rows, notes)


if __name__ == "__main__":
    main()
