"""Dynamic logit fusion on AG News: a large LM steered at inference by small topic experts, against the
large model alone, a static weight, and fine-tuning the large model on the topic.

Per seed, on ``agnews_lm`` (configs/setup/agnews_lm.yaml: BPE of 2,048 tokens, one news text per block
of 64): a small base LM (GPT-2 1 x 64) and a large one (2 x 128) trained on labels on every topic
for ``--epochs``; four experts, the base fine-tuned on one topic's training texts, and four large
models fine-tuned the same way (the upper bound the fusion is measured against), each for
``--ft-epochs`` keeping the epoch of lowest validation perplexity on its topic. Then, on each topic's
test texts (the first ``--test-limit``), teacher-forced perplexity of:

- the large model alone and its fine-tuned copy;
- static fusion, ``z_L + (z_E - z_S)`` with the topic's expert (alpha 1, proxy-tuning's rule);
- dynamic fusion with the topic's expert (single task) and with all four experts, the topic unknown
  (multi task): ``alpha`` searched per token (:mod:`mmkd.routers.fusion`).

Gap closed: ``(ppl_L - ppl_fused) / (ppl_L - ppl_L-fine-tuned)``, the paper's measure (its 96.4%,
single task). Mean ± std over ``--seeds`` seeds; every model is trained with the Python API
(``Trainer``, ``Distiller``), in a temporary directory; each seed's numbers are kept in ``--work`` and
read back by a later invocation with the same settings.

    MMKD_DATA=../shared/data python benchmarks/fusion.py [--seeds 3] [--epochs 6] [--ft-epochs 3]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from common import fmt, write
from mmkd import Distiller, Net, Term, Trainer
from mmkd.build import build_model, trainer_config
from mmkd.cli import compose
from mmkd.modalities.lm.corpus import DOMAINS, TokenBlocks
from mmkd.registry import DATASETS
from mmkd.routers.fusion import DynamicFusion, Fused
from mmkd.trainer import seed_everything

SIZES = {"base": (1, 64), "large": (2, 128)}


def topic(blocks: TokenBlocks, k: int, limit: int | None = None) -> TokenBlocks:
    """The blocks of ``blocks`` whose text is of topic ``k`` (one text per block), the first ``limit``."""
    keep = (blocks.extras["domain"][:, 0] == k).nonzero()[:, 0][:limit]
    return TokenBlocks(f"{blocks.name}:{DOMAINS[k]}", blocks.ids[keep], blocks.mask[keep], blocks.layout,
                       domain=blocks.extras["domain"][keep])


def perplexity(model: torch.nn.Module, blocks: TokenBlocks, batch: int = 64) -> tuple[float, list[float]]:
    """Teacher-forced perplexity over the kept tokens, and the fusion weights when ``model`` is
    :class:`Fused` (its router's choices, one per token and expert, flattened)."""
    nll, count, alphas = 0.0, 0, []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            ids, mask = blocks.ids[i:i + batch], blocks.mask[i:i + batch]
            logits = model(ids[:, :-1])
            nll += F.cross_entropy(logits[mask].float(), ids[:, 1:][mask], reduction="sum").item()
            count += int(mask.sum())
            if isinstance(model, Fused) and model.router.alpha is None:
                alphas += model.router.last.reshape(ids.shape[0], -1, model.router.last.shape[1])[
                    mask].flatten().tolist()
    return math.exp(nll / count), alphas


def seed_row(args, cfg, data, tests: list[TokenBlocks], seed: int, out: str) -> dict:
    """One seed: base, large, experts and fine-tuned large models trained into ``out``, and every
    model's perplexity (and the fusion weights chosen) on each topic's test texts."""
    run_cfg, meta = OmegaConf.merge(cfg, {"seed": seed}), data.meta()

    def fit(model, train, val, name, epochs, lr=None):
        net = Net(model, ["input_ids"], tokens="mask")
        trainer = Trainer(trainer_config(run_cfg, epochs, lr, data), f"{out}/{seed}/{name}",
                          tensorboard=False, progress="off")
        trainer.fit(Distiller(net, [], [Term("ce")]), train, val)
        return model.eval()

    def pretrained(size):
        seed_everything(seed)
        n_layer, n_embd = SIZES[size]
        spec = OmegaConf.merge(cfg.student, {"args": {"n_layer": n_layer, "n_embd": n_embd}})
        print(f"seed {seed}: {size} ({n_layer} x {n_embd}), {args.epochs} epochs", flush=True)
        return fit(build_model(spec, meta, size), data.train, data.val, size, args.epochs)

    base, large = pretrained("base"), pretrained("large")
    tuned = {}
    for name, model in (("expert", base), ("large_ft", large)):
        for k, dom in enumerate(DOMAINS):
            print(f"seed {seed}: {name} on {dom}, {args.ft_epochs} epochs", flush=True)
            seed_everything(seed)
            tuned[name, k] = fit(copy.deepcopy(model), topic(data.train, k), topic(data.val, k),
                                 f"{name}-{dom}", args.ft_epochs, args.ft_lr)
    experts = [tuned["expert", k] for k in range(len(DOMAINS))]
    row = {"seed": seed}
    for k, dom in enumerate(DOMAINS):
        models = {"large": large, "large_ft": tuned["large_ft", k], "base": base, "expert": experts[k],
                  "static": Fused(large, base, [experts[k]], DynamicFusion(alpha=1.0)),
                  "dynamic": Fused(large, base, [experts[k]]),
                  "dynamic_all": Fused(large, base, experts)}
        for name, model in models.items():
            value, alphas = perplexity(model, tests[k])
            row[f"{dom}/{name}"] = value
            if alphas:
                row[f"{dom}/{name}/alpha"] = statistics.mean(alphas)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--ft-epochs", type=int, default=3)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--test-limit", type=int, default=400, help="test texts per topic")
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "runs" / "fusion",
                   help="each seed's results are kept here and read back by later invocations")
    args = p.parse_args()
    cfg = compose(["experiment=lm_agnews_kd"])
    data = DATASETS[cfg.data.name](root=os.environ.get("MMKD_DATA", "data"), **cfg.data.args)
    tests = [topic(data.test, k, args.test_limit) for k in range(len(DOMAINS))]
    ppl: dict[str, list[float]] = {}
    runs, t_start = [], time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    for seed in range(args.seeds):
        done = args.work / f"seed{seed}-{args.epochs}e-{args.ft_epochs}e-{args.ft_lr:g}-{args.test_limit}.json"
        if done.is_file():
            row = json.loads(done.read_text())
        else:
            with tempfile.TemporaryDirectory() as out:
                row = seed_row(args, cfg, data, tests, seed, out)
            done.write_text(json.dumps(row, indent=1) + "\n")
        for key, v in row.items():
            if key != "seed":
                ppl.setdefault(key, []).append(v)
        runs.append(row)
        print({k: round(v, 3) for k, v in row.items()}, flush=True)

    def closed(dom, name):
        return [100 * (l - f) / (l - u) for l, f, u in zip(ppl[f"{dom}/large"], ppl[f"{dom}/{name}"],
                                                            ppl[f"{dom}/large_ft"])]

    rows = []
    for dom in [*DOMAINS, "mean"]:
        doms = DOMAINS if dom == "mean" else [dom]
        cell = {n: [statistics.mean(ppl[f"{d}/{n}"][s] for d in doms) for s in range(args.seeds)]
                for n in ("large", "large_ft", "expert", "static", "dynamic", "dynamic_all")}
        gap = {n: [statistics.mean(closed(d, n)[s] for d in doms) for s in range(args.seeds)]
               for n in ("static", "dynamic", "dynamic_all")}
        rows.append([dom, *(fmt(cell[n], 1, 2) for n in ("large", "large_ft", "expert", "static", "dynamic",
                                                        "dynamic_all")),
                     *(fmt(gap[n], 1, 1) for n in ("static", "dynamic", "dynamic_all"))])
    alpha = {n: fmt([statistics.mean(ppl[f"{d}/{n}/alpha"][s] for d in DOMAINS) for s in range(args.seeds)], 1, 2)
             for n in ("dynamic", "dynamic_all")}
    notes = (f"Teacher-forced test perplexity on each topic's first {args.test_limit} AG News test texts, mean ± std "
             f"over {args.seeds} seeds. Base 1 x 64 and large 2 x 128 GPT-2 on every topic for {args.epochs} epochs; "
             f"experts (from the base) and fine-tuned large models on one topic for {args.ft_epochs} epochs at lr "
             f"{args.ft_lr}. Static: alpha = 1 with the topic's expert; dynamic: alpha per token by the search of "
             f"mmkd.routers.fusion (grid 0..2 step 0.1), the topic's expert (single task) or all four (multi "
             f"task, 2 coordinate sweeps); mean alpha chosen: single {alpha['dynamic']}, multi (per expert) "
             f"{alpha['dynamic_all']}. Gap closed (%): (large - fused) / (large - large fine-tuned). Total time "
             f"{(time.perf_counter() - t_start) / 60:.0f} min. Command: `python benchmarks/fusion.py --seeds "
             f"{args.seeds} --epochs {args.epochs} --ft-epochs {args.ft_epochs} --test-limit {args.test_limit}` (a seed "
             f"already in --work is read back, not timed again).")
    write("fusion", {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "ppl": ppl, "runs": runs},
          ["topic", "large", "large fine-tuned", "small expert", "static fusion", "dynamic (one expert)",
           "dynamic (all experts)", "gap closed, static %", "gap closed, dynamic %", "gap closed, all experts %"],
          rows, notes)


if __name__ == "__main__":
    main()
