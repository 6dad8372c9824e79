"""GNN-to-MLP distillation accuracy: GLNN and FF-G2M students of GCN / GraphSAGE / GAT teachers on
Cora, CiteSeer and PubMed, transductive and inductive, several seeds, next to published figures.

    OMP_NUM_THREADS=1 MMKD_DATA=../shared/data python benchmarks/g2m_accuracy.py [--seeds 5]
        [--datasets cora citeseer pubmed] [--split public|glnn] [--methods glnn ffg2m] [overrides ...]

Hyper-parameters come from the shipped configs: ``g2m_glnn`` for GLNN (student, trainer, loss terms)
with GLNN's own teacher for each architecture (``teacher@teachers.gnn=glnn_<gcn|sage|gat>``: widths,
dropout, weight decay, 500-epoch cap, patience 50), and, for FF-G2M, the official best settings of
each data set and teacher, ``g2m_ffg2m_<data set>_<teacher>`` (its own teacher, student MLP, trainer
and loss weights; the official procedure). ``--ffg2m shared`` runs FF-G2M from ``g2m_ffg2m`` instead,
on GLNN's teacher and student. Extra arguments are config overrides applied to every experiment. For
every data set, setting and seed, each teacher is trained once and its outputs cached; the MLP on
labels alone and the GLNN student start from the same initialisation. ``--split public``: Planetoid's
public split; ``--split glnn``: 20 / 30 random labelled nodes a class for training / validation, the
rest for testing (GLNN's split), drawn from the seed. The inductive setting holds out 20% of the test
nodes (a different 20% per seed) and reports accuracy on them. A data set whose files are missing
under the data root is skipped with a line saying so (the shared data holds Cora and CiteSeer).

Published figures (transductive): GCN and GAT on the public split from their papers (Kipf and
Welling 2017, Table 2; Velickovic et al. 2018, Table 2); GraphSAGE teacher and GLNN on GLNN's split
from the GLNN repository's results table (transductive rows).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import time

from omegaconf import OmegaConf

from common import fmt, mean_std, write
from mmkd import Distiller, Net, Teacher, Term, Trainer, cache_teacher
from mmkd.build import build_model, trainer_config
from mmkd.cli import compose
from mmkd.config import ConfigError
from mmkd.registry import DATASETS
from mmkd.routers import ConstantRouter
from mmkd.trainer import seed_everything


# published test accuracy (%), transductive: (split, teacher) -> data set -> (teacher, GLNN student)
PUBLISHED = {
    ("public", "gcn"): {"cora": (81.5, None), "citeseer": (70.3, None), "pubmed": (79.0, None)},
    ("public", "gat"): {"cora": (83.0, None), "citeseer": (72.5, None), "pubmed": (79.0, None)},
    ("glnn", "sage"): {"cora": (78.78, 79.39), "citeseer": (68.04, 69.28), "pubmed": (74.78, 74.81)},
}


def published(split: str, teacher: str, ds: str, setting: str, which: int) -> str:
    """The published figure, or ``-``."""
    value = PUBLISHED.get((split, teacher), {}).get(ds, (None, None))[which] if setting == "transductive" else None
    return "-" if value is None else f"{value:.2f}"


def terms(cfg) -> list[Term]:
    """The loss terms of a composed experiment config."""
    return [Term(t.loss or k, t.weight, dict(t.args), name=k) for k, t in cfg.losses.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--datasets", nargs="+", default=["cora", "citeseer", "pubmed"])
    p.add_argument("--split", choices=["public", "glnn"], default="public")
    p.add_argument("--methods", nargs="+", choices=["glnn", "ffg2m"], default=["glnn", "ffg2m"])
    p.add_argument("--teachers", nargs="+", default=["gcn", "sage", "gat"])
    p.add_argument("--settings", nargs="+", default=["transductive", "inductive"])
    p.add_argument("--ffg2m", choices=["official", "shared"], default="official",
                   help="FF-G2M from the official per-teacher settings, or from g2m_ffg2m on GLNN's teacher")
    p.add_argument("--name", default="g2m_accuracy")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = os.environ.get("MMKD_DATA", "data")
    glnn_cfg = compose(["experiment=g2m_glnn", *args.overrides])
    ffg2m_cfg = compose(["experiment=g2m_ffg2m", *args.overrides])
    specs = {t: compose(["experiment=g2m_glnn", f"teacher@teachers.gnn=glnn_{t}", *args.overrides]).teachers.gnn
             for t in args.teachers}
    acc: dict[str, list[float]] = {}
    runs, skipped, datasets = [], {}, []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for ds in args.datasets:
            try:
                DATASETS[ds](root=root, split=args.split)
            except ConfigError as e:
                skipped[ds] = str(e)
                print(f"skipping {ds}: {e}", flush=True)
                continue
            datasets.append(ds)
            for setting in args.settings:
                for seed in range(args.seeds):
                    t0 = time.perf_counter()
                    data_args = {**OmegaConf.to_container(glnn_cfg.data.args), "setting": setting, "split_seed": seed,
                                 "split": args.split}
                    data = DATASETS[ds](root=root, **data_args)
                    meta = data.meta()

                    def fit(name: str, module: Distiller, exp=glnn_cfg, epochs=None, lr=None, spec=None) -> float:
                        trainer = Trainer(trainer_config(OmegaConf.merge(exp, {"seed": seed}), epochs, lr, teacher=spec),
                                          f"{out}/{ds}/{setting}/{seed}/{name}", tensorboard=False, progress="off")
                        trainer.fit(module, data.train, data.val)
                        return trainer.evaluate(module, data.test)["acc"]

                    def teacher(spec, name: str, exp=glnn_cfg):
                        """Train the teacher ``spec``; its test accuracy and its cached outputs."""
                        seed_everything(seed)
                        model = build_model(spec, meta, f"teachers.{name}")
                        test = fit(name, Distiller(Net(model, spec.inputs), [], [Term("ce")]), exp,
                                   spec.epochs, spec.get("lr"), spec)
                        return test, cache_teacher(Teacher(model, spec.inputs), data.train, f"{out}/cache")

                    def mlp(exp=glnn_cfg, init=None):
                        """The student of ``exp``: from ``init``, or freshly initialised from the seed."""
                        if init is None:
                            seed_everything(seed)
                        m = build_model(exp.student, meta, "student")
                        if init is not None:
                            m.load_state_dict(init)
                        return Net(m, exp.student.inputs)

                    init = copy.deepcopy(mlp().model.state_dict())
                    row = {"dataset": ds, "setting": setting, "seed": seed,
                           "mlp": fit("mlp", Distiller(mlp(init=init), [], [Term("ce")]))}
                    for tname in args.teachers:
                        row[tname], shared = teacher(specs[tname], tname)
                        row[f"{tname}/glnn"] = fit(f"{tname}-glnn", Distiller(
                            mlp(init=init), [shared], terms(glnn_cfg), ConstantRouter()))
                        if "ffg2m" not in args.methods:
                            continue
                        if args.ffg2m == "shared":
                            exp, row[f"{tname}/official"], t = ffg2m_cfg, row[tname], shared
                        else:
                            exp = compose([f"experiment=g2m_ffg2m_{ds}_{tname}", *args.overrides])
                            row[f"{tname}/official"], t = teacher(exp.teachers.gnn, f"{tname}-official", exp)
                        row[f"{tname}/ffg2m"] = fit(f"{tname}-ffg2m", Distiller(
                            mlp(exp, init if exp is ffg2m_cfg else None), [t], terms(exp), ConstantRouter()), exp)
                    for k, v in row.items():
                        if isinstance(v, float):
                            acc.setdefault(f"{ds}/{setting}/{k}", []).append(v)
                    row["time_s"] = time.perf_counter() - t0
                    runs.append(row)
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    rows = []
    ffg2m = "ffg2m" in args.methods
    for ds in datasets:
        for setting in args.settings:
            for tname in args.teachers:
                key = f"{ds}/{setting}"
                row = [ds, setting, tname, fmt(acc[f"{key}/{tname}"], 100), published(args.split, tname, ds, setting, 0),
                       fmt(acc[f"{key}/mlp"], 100), fmt(acc[f"{key}/{tname}/glnn"], 100),
                       published(args.split, tname, ds, setting, 1)]
                if ffg2m:
                    gain = [f - t for f, t in zip(acc[f"{key}/{tname}/ffg2m"], acc[f"{key}/{tname}/official"])]
                    row += [fmt(acc[f"{key}/{tname}/official"], 100), fmt(acc[f"{key}/{tname}/ffg2m"], 100),
                            f"{mean_std(gain)[0] * 100:+.2f}"]
                rows.append(row)
    summary = {k: {"mean": mean_std(v)[0], "std": mean_std(v)[1], "values": v} for k, v in acc.items()}
    split = ("Planetoid public split (140/500/1000 on Cora, 120/500/1000 on CiteSeer, 60/500/1000 on PubMed)"
             if args.split == "public" else "GLNN's split (20 / 30 random labelled nodes a class for training / "
             "validation, the rest for testing; drawn from the seed)")
    notes = (f"Test accuracy (%), mean ± std over {args.seeds} seeds; {split}; inductive: accuracy on the "
             f"held-out 20% of the test nodes, unseen (with their edges) in training. Teachers: GLNN's own "
             f"settings (configs/teacher/glnn_<teacher>.yaml). Published: GCN / GAT from their papers (public "
             f"split), GraphSAGE and GLNN from the GLNN repository (its split); '-' where none is published. "
             f"Student: MLP {list(glnn_cfg.student.args.hidden)} hidden, "
             f"dropout {glnn_cfg.student.args.dropout}, BatchNorm {glnn_cfg.student.args.get('batch_norm', False)} "
             f"(momentum {glnn_cfg.student.args.get('bn_momentum', 0.1)}); "
             f"Adam lr {glnn_cfg.trainer.lr}, weight decay {glnn_cfg.trainer.weight_decay}; "
             f"GLNN = KL on all (observed) nodes, from the GLNN teacher (teacher acc). "
             + (("FF-G2M = " + ("the official procedure: each data set's and teacher's official best settings "
                "(experiments g2m_ffg2m_<data set>_<teacher>: its own teacher, FF-G2M teacher acc; its own MLP, "
                "lambda, tau, dropout, 500 epochs). " if args.ffg2m == "official" else
                f"LFD + HFD from g2m_ffg2m on the GLNN teacher and student (lambda = 0, "
                f"tau = {ffg2m_cfg.losses.ffg2m_hfd.args.tau}). ") + "Δ = FF-G2M minus its teacher. ") if ffg2m else "")
             + "".join(f"Skipped {ds}: {why}. " for ds, why in skipped.items())
             + f"Total time {(time.perf_counter() - t_start) / 60:.0f} min.")
    header = ["data set", "setting", "teacher", "teacher acc", "published teacher", "MLP (labels)", "GLNN",
              "published GLNN"] + (["FF-G2M teacher acc", "FF-G2M", "Δ"] if ffg2m else [])
    write(args.name, {"overrides": args.overrides, "split": args.split, "methods": args.methods, "ffg2m": args.ffg2m,
                      "published": {f"{s}/{t}": v for (s, t), v in PUBLISHED.items()}, "skipped": skipped,
                      "summary": summary, "runs": runs}, header, rows, notes)

if __name__ == "__main__":
    main()
