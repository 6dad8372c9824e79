"""On-policy sampling (GKD's and MGSR's student samples, ``mmkd.modalities.lm.on_policy``) with the
student's key-value cache against running the whole prefix at every position.

For GPT-2 models of the sizes the LM benchmarks use (untrained: the time does not depend on the
weights), one on-policy batch of ``--batch`` blocks of ``--block`` tokens continued from their first
half, as ``on_policy.py`` samples them: seconds per batch with ``kv_cache=True`` (the default) and
``False``, timed alternately in one process for ``--rounds`` rounds, their ratio, and the share of
sampled tokens both ways agree on (float rounding can move a draw across a boundary, and the rest of
its row follows).

    python benchmarks/sampling.py [--rounds 5] [--batch 64] [--block 128]
"""
from __future__ import annotations

import argparse
import time

import torch

from common import fmt, write
from mmkd.modalities.lm.corpus import stream
from mmkd.modalities.lm.models import causal_lm
from mmkd.modalities.lm.on_policy import OnPolicy
from mmkd.net import Net

SIZES = [(1, 64, 2), (2, 128, 4), (6, 256, 8)]  # (layers, width, heads): on_policy's student and teacher, lm's teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--vocab", type=int, default=65, help="Tiny Shakespeare's characters")
    p.add_argument("--name", default="sampling")
    args = p.parse_args()
    tokens = torch.randint(args.vocab, (args.batch * args.block + 1,), generator=torch.Generator().manual_seed(0))
    batch = stream("random", tokens, args.block).__getitems__(list(range(args.batch)))
    rows, data = [], {}
    for n_layer, n_embd, n_head in SIZES:
        torch.manual_seed(0)
        student = Net(causal_lm(args.vocab, (args.block,), n_layer=n_layer, n_embd=n_embd, n_head=n_head),
                      ["input_ids"], tokens="mask")
        secs: dict[bool, list[float]] = {True: [], False: []}
        same = []
        for r in range(args.rounds):
            out = {}
            for cached in (True, False):
                t0 = time.perf_counter()
                out[cached] = OnPolicy(lambda_=1.0, seed=r, kv_cache=cached)(batch, student, [])
                secs[cached].append(time.perf_counter() - t0)
            same.append(float((out[True]["label"] == out[False]["label"]).double().mean()))
        ratio = [f / c for c, f in zip(secs[True], secs[False])]
        size = f"{n_layer} x {n_embd}"
        data[size] = {"cached_s": secs[True], "full_s": secs[False], "full_over_cached": ratio, "same_tokens": same}
        rows.append([size, fmt(secs[False], 1, 3), fmt(secs[True], 1, 3), fmt(ratio, 1, 1), fmt(same, 100, 1)])
        print(rows[-1], flush=True)
    write(args.name, {"args": vars(args), "sizes": data},
          ["GPT-2 student", "whole prefix (s / batch)", "key-value cache (s / batch)", "speed-up", "same tokens %"],
          rows, f"one on-policy batch: {args.batch} blocks of {args.block} tokens, the second half sampled "
          f"(temperature 1); mean ± std over {args.rounds} rounds, both ways timed alternately in one process; "
          f"speed-up: whole prefix / cache, per round. Command: `python benchmarks/sampling.py --rounds "
          f"{args.rounds} --batch {args.batch} --block {args.block}`.")


if __name__ == "__main__":
    main()
