"""Character-level language-model distillation on Tiny Shakespeare: a 6 x 256 GPT-2 teacher trained
once, a 2 x 128 student trained on labels alone and with each token-level divergence we ship.

The teacher (``configs/teacher/shakespeare_lm.yaml``, ``--teacher-epochs``) is trained on labels into
``<work>/teacher-<epochs>e/`` and loaded from there (``teachers.lm.checkpoint``) by every student run
and every later invocation; its top-k next-character distributions are cached once per token
(``mmkd.token_cache``, shared by all students and seeds). Each student trains for ``--epochs`` with
the protocol of ``configs/setup/shakespeare.yaml``; the kept epoch has the lowest validation
perplexity. Reported per method, over ``--seeds`` seeds: validation and test perplexity, fidelity to
the teacher on the test split (top-1 agreement, mean KL per token), seconds per training epoch. One
forward-KL run with the live teacher (``teachers.lm.cache=false``, seed 0) gives the live epoch time
the cached one is compared with; the cache's bytes per token come from its ``meta.json``.

A run whose config equals that of a finished run under ``<work>/out`` is read back, not trained again,
so an interrupted invocation resumes where it stopped.

    MMKD_DATA=../shared/data python benchmarks/lm.py [--seeds 3] [--epochs 2] [--teacher-epochs 4] [--limit BLOCKS]
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from common import fmt, mean_std, write
from mmkd.cli import compose
from mmkd.run import run
from mmkd.token_cache import bytes_per_token

METHODS = {  # method -> experiment
    "ce": "lm_shakespeare_ce", "fkl": "lm_shakespeare_fkl", "rkl": "lm_shakespeare_rkl",
    "gjsd": "lm_shakespeare_gjsd", "skew": "lm_shakespeare_skew", "tvd": "lm_shakespeare_tvd",
    "taid": "lm_shakespeare_taid", "dac_kl": "lm_shakespeare_dac_kl",
}
LABELS = {"ce": "labels only (CE)", "fkl": "forward KL", "rkl": "reverse KL", "gjsd": "GJSD (beta 0.5)",
          "skew": "skew KL (alpha 0.1)", "tvd": "total variation", "taid": "TAID", "dac_kl": "DAC-KL"}


def finished(cfg, out: Path) -> dict | None:
    """The results of a finished run under ``out`` whose config is ``cfg`` (its run directory aside)."""
    import yaml

    want = OmegaConf.to_container(cfg, resolve=True)
    want.pop("run_dir")
    for cfg_file in sorted(out.glob(f"{cfg.name or cfg.experiment}/*/config.yaml")):  # <out_dir>/<name>/<date>
        have, results = yaml.safe_load(cfg_file.read_text()), cfg_file.parent / "results.json"
        if have.pop("run_dir") and have == want and results.is_file():
            return {**json.loads(results.read_text()), "run_dir": str(cfg_file.parent)}
    return None


def train_seconds(stage: Path) -> list[float]:
    """``time/train_s`` of every epoch in a stage's ``metrics.csv``."""
    with (stage / "metrics.csv").open() as f:
        return [float(r["time/train_s"]) for r in csv.DictReader(f)]


def common(args) -> list[str]:
    return [f"out_dir={args.work / 'out'}", f"cache_dir={args.work / 'cache'}", f"data_root={args.data}",
            "trainer.progress=off", "baseline=false"]


def trained(args, overrides: list[str], what: str) -> dict:
    """The results of the run of ``overrides`` (with :func:`common`'s): a finished one under
    ``<work>/out`` read back, or a new one, announced with ``what``."""
    cfg = compose([*overrides, *common(args)])
    done = finished(cfg, args.work / "out")
    if done is None:
        print(what, flush=True)
        done = run(cfg)
    return done


def teacher_run(args) -> tuple[Path, dict]:
    """The teacher's run directory (trained now when absent) and its test perplexity and epochs."""
    folder = args.work / f"teacher-{args.teacher_epochs}e"
    if not (folder / "results.json").is_file():
        print(f"training the teacher for {args.teacher_epochs} epochs into {folder}", flush=True)
        run(compose(["experiment=lm_shakespeare_fkl", f"run_dir={folder}", f"teachers.lm.epochs={args.teacher_epochs}",
                     "trainer.max_epochs=1", *common(args)]))
    row = json.loads((folder / "results.json").read_text())["teachers"]["lm"]
    return folder, {"epochs": args.teacher_epochs, "test_ppl": row["test_ppl"], "val_ppl": row["val_ppl"],
                    "test_acc": row["test_acc"], "params": row["params"],
                    "train_s_per_epoch": statistics.mean(train_seconds(folder / "teachers" / "lm"))}


def student(args, teacher: Path, method: str, seed: int, live: bool = False) -> dict:
    overrides = [f"experiment={METHODS[method]}", f"seed={seed}", f"trainer.max_epochs={args.epochs}", *common(args)]
    if args.limit:
        overrides += [f"data.args.limit={args.limit}"]
    if method != "ce":
        overrides += [f"teachers.lm.checkpoint={teacher}"]
    if live:
        overrides += ["teachers.lm.cache=false", f"name={METHODS[method]}_live"]
    cfg = compose(overrides)
    done = finished(cfg, args.work / "out")
    if done is None:
        print(f"{method}{' (live teacher)' if live else ''}, seed {seed}", flush=True)
        done = run(cfg)
    return {**done["student"], "train_s": statistics.mean(train_seconds(Path(done["run_dir"]) / "student"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--limit", type=int, default=None, help="train students on the first LIMIT blocks only")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "runs" / "lm")
    p.add_argument("--data", default="${oc.env:MMKD_DATA,data}")
    p.add_argument("--name", default="lm")
    p.add_argument("--no-live", dest="live", action="store_false",
                   help="skip the live-teacher forward-KL run that times the cache's speed-up")
    args = p.parse_args()
    args.work = args.work.resolve()
    teacher, trow = teacher_run(args)
    rows, data = [], {"teacher": trow, "epochs": args.epochs, "seeds": args.seeds, "methods": {}}
    for m in args.methods:
        runs = [student(args, teacher, m, s) for s in range(args.seeds)]
        data["methods"][m] = runs
        fid = [fmt([r["test_agree"] for r in runs], 100), fmt([r["test_tkl"] for r in runs], 1, 3)] if m != "ce" else ["", ""]
        rows.append([LABELS[m], fmt([r["val_ppl"] for r in runs], 1, 3), fmt([r["test_ppl"] for r in runs], 1, 3),
                     *fid, f"{mean_std([r['train_s'] for r in runs])[0]:.1f}"])
    live = student(args, teacher, "fkl", 0, live=True) if args.live else None
    cached = data["methods"]["fkl"][0]["train_s"] if "fkl" in data["methods"] else None
    metas = [json.loads(m.read_text()) for m in (args.work / "cache" / "tokens").glob("*/meta.json")]
    cache = next((m for m in metas if m["examples"] == (args.limit or m["examples"])), {})  # the students' cache
    data.update(live_train_s=live and live["train_s"], cached_train_s=cached, cache=cache)
    if live:
        rows.append(["forward KL, live teacher (seed 0)", f"{live['val_ppl']:.3f}", f"{live['test_ppl']:.3f}",
                     f"{100 * live['test_agree']:.2f}", f"{live['test_tkl']:.3f}", f"{live['train_s']:.1f}"])
    speed = f"{live['train_s'] / cached:.2f}x faster" if live and cached else "not measured"
    sizes = ", ".join(f"k={k}, vocabulary {v}: {bytes_per_token(k, v)} B"
                      for k, v in ((32, 50257), (128, 50257)))  # GPT-2's vocabulary, for comparison
    notes = (f"Teacher: GPT-2 6 x 256 ({trow['params']:,} parameters), {trow['epochs']} epochs on labels: test "
             f"perplexity {trow['test_ppl']:.3f}, {trow['train_s_per_epoch']:.0f} s an epoch. Students: 2 x 128, "
             f"{args.epochs} epochs on {f'the first {args.limit} blocks' if args.limit else 'all blocks'} of the "
             f"training split, {args.seeds} seeds (mean ± std); fidelity on the test split (agreement in %, "
             f"mean KL per token in nats). A cached student epoch against the live teacher's: {speed} "
             f"(seed 0, forward KL). Token cache: top-{cache.get('k')} of {cache.get('vocab')} characters, "
             f"{cache.get('bytes_per_token')} bytes a token ({sizes}). Command: `python benchmarks/lm.py "
             f"--seeds {args.seeds} --epochs {args.epochs} --teacher-epochs {args.teacher_epochs}"
             f"{f' --limit {args.limit}' if args.limit else ''}"
             f"{' --methods ' + ' '.join(args.methods) if args.methods != list(METHODS) else ''}"
             f"{' --no-live' if not args.live else ''}{f' --name {args.name}' if args.name != 'lm' else ''}`.")
    write(args.name, data, ["student", "val ppl", "test ppl", "test agreement %", "test KL", "s / epoch"], rows, notes)


if __name__ == "__main__":
    main()
