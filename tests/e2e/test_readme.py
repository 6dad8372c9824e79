"""The README's Python snippets run as written, and what they register works in the mixture core."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    scope: dict = {}
    for block in blocks:
        exec(compile(textwrap.dedent(block), str(README), "exec"), scope)  # a block in a list item is indented
    assert 0.0 <= scope["trainer"].evaluate(scope["kd"], scope["data"].test)["acc"] <= 1.0
    history = scope["fitted"].history  # the callback's metric, the running maximum of val/acc
    assert [row["val/best_acc"] for row in history] == [max(r["val/acc"] for r in history[:i + 1])
                                                        for i in range(len(history))]

    from mmkd import LOSSES, ROUTERS, Distiller, Net, Output, Teacher, Term
    from mmkd.registry import CALLBACKS, TRANSFORMS

    assert CALLBACKS["best_so_far"] is scope["BestSoFar"]
    from mmkd.registry import POLICIES

    class At:  # the trainer attributes a policy reads
        epoch = 0
    full = scope["data"].train
    assert len(POLICIES["warm_half"]().select(At, None, full)) == len(full) // 2
    At.epoch = 1
    assert POLICIES["warm_half"]().select(At, None, full) is full
    jitter, image = TRANSFORMS["jitter"](sigma=0.5), torch.zeros(64, 1, 8, 8)
    torch.manual_seed(0)
    moved = jitter({"image": image}, None, [])["image"]
    assert abs(float(moved.std()) - 0.5) < 0.05 and not jitter.keeps_inputs

    assert {"teacher": True, "per_sample": True, "batch": False}.items() <= LOSSES.meta("soft_l1").items()
    router = ROUTERS["low_entropy"]()
    sure, unsure = torch.tensor([[9.0, 0.0]]), torch.tensor([[0.1, 0.0]])
    w = router(Output(sure), [Output(sure), Output(unsure)], {})
    assert w.shape == (1, 2) and w[0, 0] > w[0, 1] and torch.isclose(w.sum(), torch.tensor(1.0))

    student = Net(torch.nn.Linear(3, 2), ["x"])
    teachers = [Teacher(torch.nn.Linear(3, 2), ["x"]) for _ in range(2)]
    batch = {"x": torch.randn(4, 3), "label": torch.tensor([0, 1, 1, 0])}
    losses = Distiller(student, teachers, [Term("soft_l1")], router)(batch)
    assert losses["soft_l1"].requires_grad and losses["loss"] > 0
