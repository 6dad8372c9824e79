"""PGKD: performance-guided distillation for text classification (Di Palo, Singhi and Fadlallah,
"Performance-Guided LLM Knowledge Distillation for Efficient Text Classification at Scale", EMNLP 2024
Industry Track, arXiv:2411.05045).

An active loop in which a teacher writes new training texts where a classifier student is weakest.
Cycle 0 trains the student on the labelled training set. Each cycle ``c = 1, 2, ...`` then:

1. **Validation report.** The best student so far is evaluated on the validation split: its per-class
   ``F1_k`` and its hard negatives, the validation items it gets wrong, most confident first
   (confidence ``max_k p_S(k | x)``).
2. **Generation.** ``per_cycle`` texts for the ``worst`` classes of lowest ``F1_k`` (equal shares), by
   a class-conditional LM (``generator``: a finished run on a corpus whose documents start with
   ``"<class>: "``, e.g. ``agnews_lm`` with ``label_prefix``). The prompt is ``"<class>: "``, followed,
   for a share ``hard`` of a class's texts, by the first ``prompt_words`` words of one of its hard
   negatives (in order, cycled): texts near what the student confuses. Each continuation of at most
   ``max_new_tokens`` tokens ends at the generator's ``eos``; it is sampled at ``temperature`` from the
   top-``top_p`` nucleus, seeded by the run's seed and the cycle.
3. **Labelling.** The teacher labels each text with its top class ``y = argmax_k p_T(k | x)``.
4. **Retraining.** The student continues from the best student on the labelled set plus every text
   generated so far (the policy ``appended``), with the run's losses (CE, as the paper's student) and
   trainer.
5. **Early stopping.** A cycle whose student does not beat the best validation accuracy is not kept;
   after ``patience`` such cycles in a row, or ``cycles`` cycles, the loop ends. The run's student is
   the best one.

The paper's teacher is one LLM (Claude 3 Sonnet) that writes and labels texts in a single prompt
holding the validation report, the hard negatives and training samples; here, with no pretrained LLM,
its two roles are a class-conditional LM trained on the corpus (the writer) and a fine-tuned classifier
(the labeller). The loop follows the paper's Algorithm 1 (validation report and hard negatives each
step, the accumulated data set, early stopping on validation); no official code was published.
The paper publishes no generation budget or patience; ``per_cycle: 200``, ``worst: 2``, ``hard: 0.5``
and ``patience: 2`` are this implementation's defaults at CPU scale (``benchmarks/pgkd.py`` also
measures ``per_cycle: 1000``).

One ``mmkd run`` (``pipeline: pgkd``, options under ``method``) runs every cycle as a ``distill`` run in
``<run_dir>/cycle<c>/``; the teacher is given (``checkpoint``), or trained on the labels first
(``<run_dir>/teacher0/``). ``cycle<c>/generated.tsv`` lists the cycle's texts (the class asked for,
the teacher's label and confidence, the text) and ``generation.json`` its counts and validation F1;
``generated<c>.npz`` holds every generated item so far as model inputs. The run directory gets the best student's ``student.pt`` and ``results.json``
with a row per cycle; ``resume=true`` keeps finished cycles.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset

from mmkd import io, run
from mmkd.build import load_data, trainer_config
from mmkd.checks import COUNT
from mmkd.config import ConfigError
from mmkd.models import Generative
from mmkd.net import Net
from mmkd.policies import DataPolicy, register_policy
from mmkd.preprocess import apply_text
from mmkd.registry import LOSSES, PIPELINES
from mmkd.trainer import Trainer

from .active import outputs
from .comd import fetch, first_teacher, model_node, phase_config, teacher_node, trained
from .self_distill import run_round, scores

log = logging.getLogger("mmkd")

OPTIONS = {"generator": None, "cycles": 5, "per_cycle": 200, "worst": 2, "hard": 0.5, "prompt_words": 4,
           "patience": 2, "max_new_tokens": 48, "temperature": 1.0, "top_p": 0.95, "batch_size": 256}


def f1_per_class(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k)`` for each class (0 where the class is neither
    predicted nor present)."""
    f1 = torch.zeros(num_classes, dtype=torch.float64)
    for k in range(num_classes):
        tp = int(((pred == k) & (target == k)).sum())
        wrong = int(((pred == k) != (target == k)).sum())
        f1[k] = 2 * tp / (2 * tp + wrong) if tp or wrong else 0.0
    return f1


def hard_negatives(probs: Tensor, target: Tensor) -> Tensor:
    """The items whose top class is not ``target``, most confident (``max_k p(k)``) first, ties to the
    lower index."""
    conf, pred = probs.max(1)
    wrong = (pred != target).nonzero().flatten().tolist()
    return torch.tensor(sorted(wrong, key=lambda i: (-float(conf[i]), i)), dtype=torch.long)


def plan(f1: Tensor, hard: Tensor, target: Tensor, texts: Sequence[str] | None, names: Sequence[str],
         opts: dict) -> list[tuple[int, str]]:
    """The ``(class, prompt)`` of each text a cycle generates (module docstring, step 2): ``per_cycle``
    texts over the ``worst`` classes of lowest F1 (ties to the lower class; the first classes take the
    remainder), a share ``hard`` of each class's prompts extended by the first ``prompt_words`` words of
    the class's hard negatives (``hard``: item indices in order; ``target``: their labels)."""
    worst = sorted(range(len(f1)), key=lambda k: (float(f1[k]), k))[:opts["worst"]]
    base, extra = divmod(opts["per_cycle"], len(worst))
    out = []
    for j, k in enumerate(worst):
        n = base + (j < extra)
        mine = [int(i) for i in hard if int(target[i]) == k] if texts is not None else []
        n_hard = round(opts["hard"] * n) if mine else 0
        for i in range(n):
            prompt = f"{names[k]}: "
            if i < n_hard:
                prompt += " ".join(texts[mine[i % len(mine)]].split()[:opts["prompt_words"]])
            out.append((k, prompt))
    return out


def write(generator: Generative, tokenizer, prompts: Sequence[str], opts: dict, seed: int) -> list[str]:
    """Each prompt's text: its words after the ``"<class>: "`` prefix, then the generator's continuation
    (cut at ``eos``), decoded. Prompts of one token length are generated together, ``batch_size`` at a
    time; batch ``b`` is seeded by ``seed`` and ``b``."""
    device = next(generator.parameters()).device
    encoded = [tokenizer.encode(p) for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    out: list[str] = [""] * len(prompts)
    b = 0
    for _, members in sorted(groups.items()):
        for s in range(0, len(members), opts["batch_size"]):
            chunk = members[s:s + opts["batch_size"]]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            new = generator.generate(ids, opts["max_new_tokens"], opts["temperature"], opts["top_p"],
                                     seed * 1_000_003 + b).tolist()
            b += 1
            for i, row in zip(chunk, new):
                row = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
                head = prompts[i].partition(": ")[2]
                out[i] = f"{head} {tokenizer.decode(row)}".strip() if head else tokenizer.decode(row).strip()
    return out


class Appended(Dataset):
    """``dataset`` followed by the rows of ``extra`` (tensors of ``dataset``'s item keys, but ``index``,
    with one row per added item); ``index``, where ``dataset`` has it, is the row's position here."""

    def __init__(self, dataset: Dataset, extra: dict[str, Tensor]):
        self.dataset, self.extra, self.n = dataset, extra, len(dataset)
        self.m = len(next(iter(extra.values()))) if extra else 0

    def __len__(self) -> int:
        return self.n + self.m

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, ids: Sequence[int]) -> dict[str, Tensor]:
        ids = [int(i) for i in ids]
        mine = [i for i in ids if i < self.n]
        added = torch.tensor([i - self.n for i in ids if i >= self.n], dtype=torch.long)
        parts = [fetch(self.dataset, mine)] if mine else []
        if len(added):
            parts.append({k: v[added] for k, v in self.extra.items()})
        keys = [k for k in parts[0] if k != "index"]
        batch = {k: torch.cat([p[k] for p in parts]) for k in keys}
        order = torch.tensor(sorted(range(len(ids)), key=lambda j: (ids[j] >= self.n, j)))  # batch row of each id
        back = torch.empty_like(order)
        back[order] = torch.arange(len(ids))
        batch = {k: v[back] for k, v in batch.items()}
        if "index" in parts[0]:
            batch["index"] = torch.tensor(ids)
        return batch


def read_items(path: str) -> dict[str, Tensor]:
    """The tensors of the ``.npz`` file ``path`` (no pickle), one row per item; a bad file is a
    :class:`ConfigError` naming the policy's key."""
    if not Path(path).is_file():
        raise ConfigError(f"policies.appended.items: no such file {str(path)!r}; give the .npz file of the added items")
    try:
        with np.load(path, allow_pickle=False) as z:
            items = {k: torch.from_numpy(z[k]) for k in z.files}
    except ValueError as e:
        raise ConfigError(f"policies.appended.items: {str(path)!r} is not a NumPy .npz file of arrays ({e})") from None
    if not items or len({len(v) for v in items.values()}) != 1:
        raise ConfigError(f"policies.appended.items: {str(path)!r} holds arrays of {sorted({len(v) for v in items.values()})} "
                          "rows; give one row per item in every array")
    return items


@register_policy("appended")
class AppendedPolicy(DataPolicy):
    """Train on the training set plus the items of ``items`` (a ``.npz`` file of arrays named as the
    training items' entries, one row per added item, no pickle; :class:`Appended`)."""

    def __init__(self, items: str):
        self.items = read_items(items)
        self._made: tuple[int, Appended] | None = None

    def select(self, trainer, module, dataset):
        if self._made is None or self._made[0] != id(dataset):  # one wrapper: the trainer keeps its loader
            first = fetch(dataset, [0])
            missing = sorted(set(first) - set(self.items) - {"index"})
            if missing:
                raise ConfigError(f"policies.appended.items: the added items lack {', '.join(missing)}, entries of "
                                  "the training items; give every entry but index")
            self._made = (id(dataset), Appended(dataset, {k: self.items[k].to(first[k].dtype) for k in first
                                                          if k != "index"}))
        return self._made[1]

    def planned(self, dataset):
        return self.select(None, None, dataset)

    def on_epoch_end(self, trainer, module, metrics):
        metrics["pgkd/appended"] = float(self._made[1].m if self._made else 0)


def options(cfg: DictConfig) -> dict:
    """``cfg.method`` over :data:`OPTIONS`, checked; a bad value is a one-line :class:`ConfigError`."""
    given = OmegaConf.to_container(cfg.get("method") or {}, resolve=True)
    for key in given:
        if key not in OPTIONS:
            raise ConfigError(f"method.{key}: unknown option of pipeline pgkd; valid keys: {', '.join(OPTIONS)}")
    opts = {**OPTIONS, **given}
    if not opts["generator"] or not (Path(opts["generator"]) / "results.json").is_file():
        raise ConfigError(f"method.generator={opts['generator']!r}; give the run directory of a finished class-"
                          "conditional language model (e.g. experiment=lm_agnews_writer)")
    for key in ("cycles", "per_cycle", "worst", "prompt_words", "patience", "max_new_tokens", "batch_size"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"method.{key}={v!r}; give a whole number >= 1")
    for key, ok, what in (("hard", lambda v: 0 <= v <= 1, "a share in [0, 1]"),
                          ("temperature", lambda v: v >= 0, "0 (greedy) or a positive temperature"),
                          ("top_p", lambda v: 0 < v <= 1, "a nucleus mass in (0, 1]")):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ConfigError(f"method.{key}={v!r}; give {what}")
    if len(cfg.teachers) != 1:
        raise ConfigError(f"teachers: {', '.join(cfg.teachers) or 'none'}; pipeline pgkd takes one teacher, the "
                          "labeller of the generated texts")
    return opts


def load_generator(run_dir: str, names: Sequence[str]):
    """The generator run's language model (eval mode) and tokenizer."""
    from mmkd.export import trained_student
    from mmkd.generate import load_tokenizer

    model, gcfg, _ = trained_student(run_dir)
    if not isinstance(model, Generative):
        raise ConfigError(f"method.generator: the student of {run_dir!r} ({gcfg.student.name}) is not a generative "
                          "language model; give the run of a causal LM")
    if not names:
        raise ConfigError("pipeline pgkd: the data set names no classes; the generator's prompts are '<class>: '")
    return model.eval(), load_tokenizer(run_dir)


def item_arrays(texts: Sequence[str], labels: Tensor, step: dict, like: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """The added items of ``texts`` as arrays of the training items' entries ``like`` (one item, as a
    batch): the text step's keys, ``label``, and -1 for any other entry (e.g. ``row``)."""
    tokens = apply_text(step, list(texts))
    out = {}
    for k, v in like.items():
        if k == "index":
            continue
        if k in tokens:
            out[k] = tokens[k].to(v.dtype).numpy()
        elif k == "label":
            out[k] = labels.to(v.dtype).numpy()
        else:
            out[k] = torch.full((len(texts), *v.shape[1:]), -1, dtype=v.dtype).numpy()
    return out


@torch.no_grad()
def teacher_probs(model: torch.nn.Module, keys: list[str], arrays: dict[str, np.ndarray], device: torch.device,
                  batch_size: int) -> Tensor:
    """``model``'s softmax probabilities on the items of ``arrays`` (eval mode), ``[items, classes]``."""
    net = Net(model, keys).to(device).eval()
    n = len(next(iter(arrays.values())))
    out = [net({k: torch.from_numpy(arrays[k][s:s + batch_size]).to(device) for k in keys}).logits.float().softmax(1).cpu()
           for s in range(0, n, batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 1)


def save_tsv(path: Path, asked: Sequence[int], labels: Tensor, conf: Tensor, texts: Sequence[str],
             names: Sequence[str]) -> None:
    """``generated.tsv``: per generated text, the class asked for, the teacher's label and confidence, the text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["asked", "label", "confidence", "text"])
        for a, y, c, t in zip(asked, labels.tolist(), conf.tolist(), texts):
            w.writerow([names[a], names[y], f"{c:.4f}", t])


@PIPELINES.register("pgkd")
def pgkd(cfg: DictConfig) -> dict[str, Any]:
    """Cycle 0 on the labelled data, then up to ``method.cycles`` cycles of validation report,
    generation, labelling and retraining, stopped early on validation (module docstring)."""
    t_start = time.perf_counter()
    opts = options(cfg)
    data, meta = load_data(cfg)
    steps = list(meta["text_inputs"].values())
    if len(steps) != 1:
        raise ConfigError(f"pipeline pgkd: data set {cfg.data.name!r} has {len(steps)} raw text inputs; it needs one "
                          "(the texts it generates become that input)")
    texts = getattr(data.val, "texts", None)
    if texts is None and opts["hard"] > 0:
        raise ConfigError(f"method.hard={opts['hard']}: data set {cfg.data.name!r} gives no raw validation texts for "
                          "hard-negative prompts; set method.hard=0")
    names = list(data.class_names)
    generator, tokenizer = load_generator(opts["generator"], names)
    run_dir = run.start(cfg, meta)
    label = run.label(cfg)
    (tname, tc), = cfg.teachers.items()
    device = Trainer(trainer_config(cfg)).device
    generator.to(device)
    t_weights, row = first_teacher(cfg, meta, run_dir, label)
    teacher = trained(Path(t_weights), tc, meta, f"teachers.{tname}")
    row.pop("round")
    rows: list[dict] = [row]
    router, losses = OmegaConf.to_container(cfg.router), OmegaConf.to_container(cfg.losses)
    reads = any(LOSSES.meta(spec.get("loss") or k)["teacher"] for k, spec in losses.items())
    like = fetch(data.train, [0])
    val_plain = data.val.plain() if hasattr(data.val, "plain") else data.val
    best = bad = None
    items: Path | None = None
    for c in range(opts["cycles"] + 1):
        here = run_dir / f"cycle{c}"
        new_row: dict[str, Any] = {"cycle": c}
        if c:
            probs, target, _ = outputs(trained(best[1], cfg.student, meta, "student"), list(cfg.student.inputs),
                                       val_plain, device, opts["batch_size"])
            f1 = f1_per_class(probs.argmax(1), target, len(names))
            todo = plan(f1, hard_negatives(probs, target), target, texts, names, opts)
            file, stats = run_dir / f"generated{c}.npz", here / "generation.json"
            if cfg.resume and file.is_file() and stats.is_file():
                new_row.update(json.loads(stats.read_text()))
            else:
                new = write(generator, tokenizer, [p for _, p in todo], opts, cfg.seed * 1000 + c)
                keep = [i for i, t in enumerate(new) if t]
                new, asked = [new[i] for i in keep], [todo[i][0] for i in keep]
                arrays = item_arrays(new, torch.zeros(len(new), dtype=torch.long), steps[0], like)
                t_probs = teacher_probs(teacher, list(tc.inputs), arrays, device, opts["batch_size"])
                conf, labels = t_probs.max(1)
                arrays["label"] = labels.to(like["label"].dtype).numpy()
                save_tsv(here / "generated.tsv", asked, labels, conf, new, names)
                if items is not None:
                    with np.load(items, allow_pickle=False) as old:
                        arrays = {k: np.concatenate([old[k], v]) for k, v in arrays.items()}
                np.savez(file, **arrays)
                new_row.update(generated=len(new), asked={names[k]: asked.count(k) for k in sorted(set(asked))},
                               on_target=float(np.mean([a == y for a, y in zip(asked, labels.tolist())])) if new else 0.0,
                               f1={n: float(v) for n, v in zip(names, f1)})
                io.write_text(json.dumps({k: v for k, v in new_row.items() if k != "cycle"}, indent=2) + "\n", stats)
            items = file
        policies = [{"name": "appended", "args": {"items": str(items)}}] if items is not None else []
        teachers = {tname: teacher_node(tc, t_weights, items is None)} if reads else {}
        res = run_round(phase_config(cfg, here, f"{label}_cycle{c}", model_node(cfg.student, best and str(best[1])),
                                     teachers, router, losses, policies))
        val = float(res["student"]["val_acc"])
        kept = best is None or val > best[0]
        new_row.update(scores(res), kept=kept, run_dir=str(here))
        rows.append(new_row)
        log.info("pgkd cycle %d: val acc %.4f (%s), test acc %s", c, val, "kept" if kept else "not kept",
                 res["student"].get("test_acc"))
        if kept:
            best, bad, last = (val, here / "student.pt", c), 0, res
        else:
            bad += 1
            if bad >= opts["patience"]:
                break
    io.save(io.load(best[1], "the best cycle's student", "rerun with resume=true"), run_dir / "student.pt")
    out = {"experiment": cfg.experiment, "seed": cfg.seed, "run_dir": str(run_dir), "pipeline": "pgkd",
           "metrics": trainer_config(cfg, data=data).metrics, "cycles": rows, "best_cycle": best[2],
           "student": last["student"], "latency_batch": last["latency_batch"]}
    return run.finish(cfg, run_dir, out, t_start)
