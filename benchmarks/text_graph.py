"""Your own data: a CiteSeer-like text-attributed graph through the ``text_graph`` loader; GCN teacher vs
MLP on labels vs GLNN, transductive and inductive, several seeds; then the MLP predicts held-out nodes
from their texts alone (the ``sentence_embedding`` text step, as ``mmkd predict`` runs it).

    OMP_NUM_THREADS=1 MMKD_DATA=../shared/data python benchmarks/text_graph.py [--seeds 5] [overrides ...]

No text graph ships with the shared data (the Planetoid files hold bags of words, not texts; AG News
holds texts, not links), so the graph is built: ``--nodes`` AG News sentences of ``dev.tsv`` (balanced
over its 4 classes) are the nodes, labelled with their topics, and the edges are drawn at random with
CiteSeer's statistics, measured on the shipped CiteSeer files: its mean degree (2.74), its edge
homophily (the share of edges joining two nodes of one class: 0.736) and its share of isolated nodes
(1.4%). Each node gets a log-normal activity (sigma 1), so degrees are skewed as in a citation graph;
every node but the isolated ones gets one edge, then edges are added from nodes drawn by activity
until the mean degree is reached; each edge joins its node to one drawn by activity, of the same
class with probability h, else of another. The links therefore carry label information the texts
do not (as citations do), at CiteSeer's strength, and do not depend on the texts. (A k-nearest-
neighbour graph of the texts' own embeddings would be the other choice; its links would mostly
repeat what the features already say.) The node table (CSV, with
the topics as text labels) and the edge list are written to a temporary data root and read by
``text_graph`` like any user's files; features: all-MiniLM-L6-v2 sentence embeddings (cached under
``--cache-dir``). Hyper-parameters: the shipped ``g2m_glnn`` experiment (GCN teacher, MLP student,
KL on all observed nodes); GLNN's split (20 / 30 labelled nodes per class for train / val, the rest
test); inductive: 20% of the test nodes and their edges unseen in training, accuracy on them.
``--normalize`` also runs the old default (``row``: divide each embedding by its sum) beside ``auto``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from common import fmt, mean_std, write
from mmkd import Distiller, Net, Teacher, Term, Trainer, cache_teacher, preprocess
from mmkd.build import build_model, trainer_config
from mmkd.cli import compose
from mmkd.graphs import text_graph as text_graph_module
from mmkd.registry import DATASETS
from mmkd.routers import ConstantRouter
from mmkd.trainer import seed_everything

CITESEER = {"mean_degree": 2.74, "homophily": 0.736, "isolated": 0.014}  # only where the CiteSeer files are absent


def citeseer_stats(root: str) -> dict:
    """CiteSeer's mean (undirected) degree, edge homophily and share of isolated nodes, from the
    shipped raw files."""
    from mmkd.graphs import planetoid

    try:
        g = planetoid(Path(root) / "planetoid", "citeseer")
    except Exception as e:  # noqa: BLE001  (no files: fall back to the published figures)
        print(f"CiteSeer not readable ({e}); using {CITESEER}")
        return dict(CITESEER)
    src, dst = g.edge_index
    deg = torch.bincount(src, minlength=g.num_nodes)
    return {"mean_degree": g.edge_index.shape[1] / g.num_nodes,
            "homophily": float((g.y[src] == g.y[dst]).float().mean()),
            "isolated": float((deg == 0).float().mean())}


def build_graph(root: str, folder: Path, n: int, stats: dict, seed: int = 0) -> dict:
    """Write ``folder/nodes.csv`` (id, text, label) and ``folder/edges.csv`` (source, target) of the
    synthetic graph described in the module docstring; return its statistics."""
    from mmkd.modalities.agnews import CLASS_NAMES, read_tsv

    texts, labels = read_tsv(Path(root) / "agnews" / "dev.tsv")
    g = torch.Generator().manual_seed(seed)
    per = n // len(CLASS_NAMES)
    picked = torch.cat([(labels == c).nonzero().flatten()[torch.randperm(int((labels == c).sum()), generator=g)[:per]]
                        for c in range(len(CLASS_NAMES))])
    picked = picked[torch.randperm(len(picked), generator=g)]
    y = labels[picked]
    n = len(picked)
    activity = torch.exp(torch.randn(n, generator=g))  # log-normal: a few hubs, many nodes of degree 1-2
    activity[torch.randperm(n, generator=g)[:round(stats["isolated"] * n)]] = 0  # CiteSeer's isolated share
    linked = (activity > 0).nonzero().flatten()
    edges: set[tuple[int, int]] = set()
    deg = torch.zeros(n, dtype=torch.long)

    def add(u: int) -> None:
        """An edge from ``u`` to a node drawn by activity: of ``u``'s class with probability h."""
        same = bool(torch.rand(1, generator=g) < stats["homophily"])
        pool = linked[(y[linked] == y[u]) == same]
        v = int(pool[torch.multinomial(activity[pool], 1, generator=g)])
        if u != v and (min(u, v), max(u, v)) not in edges:
            edges.add((min(u, v), max(u, v)))
            deg[u] += 1
            deg[v] += 1

    for u in linked[torch.randperm(len(linked), generator=g)].tolist():  # every linked node: one edge at least
        while deg[u] == 0:
            add(u)
    m = round(n * stats["mean_degree"] / 2)
    while len(edges) < m:  # the rest: both endpoints by activity
        add(int(linked[torch.multinomial(activity[linked], 1, generator=g)]))
    with open(folder / "nodes.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for i, row in enumerate(picked.tolist()):
            w.writerow([f"n{i}", texts[row], CLASS_NAMES[int(y[i])]])
    with open(folder / "edges.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["source", "target"])
        w.writerows([(f"n{u}", f"n{v}") for u, v in sorted(edges)])
    e = torch.tensor(sorted(edges)).T
    return {"nodes": n, "edges": len(edges), "mean_degree": 2 * len(edges) / n,
            "homophily": float((y[e[0]] == y[e[1]]).float().mean()), "isolated": int((deg == 0).sum()),
            "max_degree": int(deg.max()), "median_degree": float(deg[deg > 0].median())}


def terms(cfg) -> list[Term]:
    return [Term(t.loss or k, t.weight, dict(t.args), name=k) for k, t in cfg.losses.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--nodes", type=int, default=3000)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--settings", nargs="+", default=["transductive", "inductive"])
    p.add_argument("--normalize", nargs="+", default=["auto", "row"])
    p.add_argument("--cache-dir", default=None, help="sentence-embedding cache (default: ~/.cache/mmkd)")
    p.add_argument("--name", default="text_graph")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("mmkd").setLevel(logging.INFO if os.environ.get("MMKD_VERBOSE") else logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # MiniLM is loaded once per data set build
    root = os.environ.get("MMKD_DATA", "data")
    cfg0 = compose(["experiment=g2m_glnn", *args.overrides])
    spec = cfg0.teachers.gnn
    t_start = time.perf_counter()
    acc: dict[str, list[float]] = {}
    runs, deploy = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(tmp) / "data"
        data_root.mkdir()
        stats = citeseer_stats(root)
        graph = build_graph(root, data_root, args.nodes, stats)
        print(f"graph: {graph}; CiteSeer: {stats}")
        t0 = time.perf_counter()
        common = {"nodes": "nodes.csv", "edges": "edges.csv", "max_length": args.max_length, "split": "glnn",
                  "cache_dir": args.cache_dir}
        cache = Path(args.cache_dir) if args.cache_dir else text_graph_module.default_cache_dir()
        before = set(cache.glob("text_graph-*.pt"))
        DATASETS["text_graph"](root=str(data_root), **common)  # encode once (a cache miss at most)
        encode_s = time.perf_counter() - t0
        encoded = "encoded" if set(cache.glob("text_graph-*.pt")) - before else "read from the cache"
        for norm in args.normalize:
            for setting in args.settings:
                for seed in range(args.seeds):
                    t1 = time.perf_counter()
                    data = DATASETS["text_graph"](root=str(data_root), **common, setting=setting, split_seed=seed,
                                                  normalize=norm)
                    meta = data.meta()
                    cfg = copy.deepcopy(cfg0)
                    cfg.seed = seed
                    where = f"{tmp}/runs/{norm}/{setting}/{seed}"

                    def fit(name: str, module: Distiller, epochs: int | None = None) -> float:
                        trainer = Trainer(trainer_config(cfg, epochs), f"{where}/{name}", tensorboard=False,
                                          progress="off")
                        trainer.fit(module, data.train, data.val)
                        return trainer.evaluate(module, data.test)["acc"]

                    seed_everything(seed)
                    init = copy.deepcopy(build_model(cfg0.student, meta, "student").state_dict())

                    def mlp() -> Net:
                        m = build_model(cfg0.student, meta, "student")
                        m.load_state_dict(init)
                        return Net(m, cfg0.student.inputs)

                    row = {"normalize": norm, "setting": setting, "seed": seed,
                           "mlp": fit("mlp", Distiller(mlp(), [], [Term("ce")]))}
                    seed_everything(seed)
                    model = build_model(spec, meta, "teachers.gnn")
                    row["gcn"] = fit("gcn", Distiller(Net(model, spec.inputs), [], [Term("ce")]), spec.epochs)
                    teacher = cache_teacher(Teacher(model, spec.inputs), data.train, f"{tmp}/cache")
                    student = mlp()
                    row["glnn"] = fit("glnn", Distiller(student, [teacher], terms(cfg0), ConstantRouter()))
                    if setting == "inductive" and seed == 0 and norm == args.normalize[0]:
                        deploy = predict_from_text(data, student.model, data_root / "nodes.csv", row["glnn"])
                    for k in ("mlp", "gcn", "glnn"):
                        acc.setdefault(f"{norm}/{setting}/{k}", []).append(row[k])
                    row["time_s"] = time.perf_counter() - t1
                    runs.append(row)
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    header = ["normalize", "setting", "GCN teacher", "MLP (labels)", "GLNN", "GLNN - MLP", "GLNN - GCN"]
    rows = []
    for norm in args.normalize:
        for setting in args.settings:
            k = f"{norm}/{setting}"
            rows.append([norm, setting, fmt(acc[f"{k}/gcn"], 100), fmt(acc[f"{k}/mlp"], 100), fmt(acc[f"{k}/glnn"], 100),
                         f"{100 * (mean_std(acc[f'{k}/glnn'])[0] - mean_std(acc[f'{k}/mlp'])[0]):+.2f}",
                         f"{100 * (mean_std(acc[f'{k}/glnn'])[0] - mean_std(acc[f'{k}/gcn'])[0]):+.2f}"])
    summary = {k: {"mean": mean_std(v)[0], "std": mean_std(v)[1], "values": v} for k, v in acc.items()}
    total = (time.perf_counter() - t_start) / 60
    notes = (f"Test accuracy (%), mean ± std over {args.seeds} seeds (the split and the initialisations change "
             f"with the seed; the graph is the same). Graph: {graph['nodes']:,} AG News sentences (4 topics, "
             f"{graph['nodes'] // 4} each) as nodes, {graph['edges']:,} random undirected edges drawn with "
             f"CiteSeer's statistics: mean degree {graph['mean_degree']:.2f}, edge homophily {graph['homophily']:.3f}, "
             f"{graph['isolated']} isolated nodes ({100 * graph['isolated'] / graph['nodes']:.1f}%) (CiteSeer: "
             f"{stats['mean_degree']:.2f}, {stats['homophily']:.3f}, {100 * stats['isolated']:.1f}%); median degree "
             f"{graph['median_degree']:.0f}, max {graph['max_degree']}. Features: all-MiniLM-L6-v2 mean-pooled sentence embeddings "
             f"(384, max_length {args.max_length}), {encoded} once ({encode_s:.0f} s with loading MiniLM). Split: GLNN's "
             f"20 / 30 per class, the rest test; inductive: accuracy on the 20% of the test nodes held out with "
             f"their edges. Models: the g2m_glnn experiment (GCN teacher: hidden {spec.args.hidden}, dropout "
             f"{spec.args.dropout}, {spec.epochs} epochs; MLP student {list(cfg0.student.args.hidden)} with BatchNorm, "
             f"{cfg0.trainer.max_epochs} epochs, patience {cfg0.trainer.patience}; GLNN = KL on all observed nodes). normalize=auto leaves "
             f"the embeddings as they are (they have negative values); row is the loaders' old default. "
             f"Total {total:.1f} min.")
    if deploy:
        notes += (f"\n\nDeployment (inductive, seed 0, normalize={args.normalize[0]}): the GLNN MLP classified the "
                  f"{deploy['nodes']} held-out nodes from their texts alone (the recorded sentence_embedding text "
                  f"step, then the MLP): accuracy {100 * deploy['acc']:.2f}% vs {100 * deploy['eval_acc']:.2f}% from "
                  f"the cached features; largest feature difference {deploy['max_abs_diff']:.1e}; "
                  f"{deploy['agree']:.4f} of the predictions agree.")
    write(args.name, {"overrides": args.overrides, "graph": graph, "citeseer": stats, "summary": summary,
                      "deploy": deploy, "runs": runs, "encode_s": encode_s, "features": encoded},
          header, rows, notes)


@torch.no_grad()
def predict_from_text(data, model, nodes_csv: Path, eval_acc: float) -> dict:
    """What ``mmkd predict`` does for a text graph, on the held-out test nodes: their texts through the
    recorded text step, the recorded feature steps, the MLP; compared with the cached features."""
    with open(nodes_csv, newline="", encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f)]
    test = data.test[0]
    nodes = (test["label"] >= 0).nonzero().flatten()
    x = preprocess.apply_text(data.text_inputs["text"], [texts[i] for i in nodes.tolist()])["x"]
    x = preprocess.apply(data.preprocessing.get("x", []), x)
    model.eval()
    pred = model(x).argmax(1)
    cached = model(test["x"][nodes]).argmax(1)
    return {"nodes": len(nodes), "acc": float((pred == test["label"][nodes]).float().mean()), "eval_acc": eval_acc,
            "max_abs_diff": float((x - test["x"][nodes]).abs().max()), "agree": float((pred == cached).float().mean())}


if __name__ == "__main__":
    main()
