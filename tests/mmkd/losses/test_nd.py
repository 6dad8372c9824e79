"""The ND loss (mmkd.losses.features.nd): a naive loop reference, its minimum, gradients, and the
nd_centers callback's class means of the teacher's embeddings (computed once, kept on resume)."""
import math

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, Trainer
from mmkd.losses import nd
from mmkd.losses.features.nd import NDCenters
from mmkd.routers import ConstantRouter

F64 = torch.float64


def ref_nd(S, T, Y, centers):
    out = []
    for s, t, y in zip(S.tolist(), T.tolist(), Y.tolist()):
        c = centers[y].tolist()
        norm = math.sqrt(sum(v * v for v in c))
        dot = sum(a * b / norm for a, b in zip(s, c))
        out.append(1 - dot / max(math.sqrt(sum(v * v for v in s)), math.sqrt(sum(v * v for v in t))))
    return torch.tensor(out, dtype=F64)


def make(b=6, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=F64), torch.randn(b, d, generator=g, dtype=F64),
            torch.randint(0, c, (b,), generator=g), torch.randn(c, d, generator=g, dtype=F64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_naive_reference(seed):
    s, t, y, c = make(seed=seed)
    ref = ref_nd(s, t, y, c)
    torch.testing.assert_close(nd(s, t, y, centers=c, reduction="none"), ref)
    torch.testing.assert_close(nd(s, t, y, centers=c), ref.mean())


def test_minimum_along_the_centre_at_least_as_long_as_the_teacher():
    c = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=F64)
    y = torch.tensor([0, 1])
    t = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=F64)  # norms sqrt(2) and 2
    on_centre = torch.nn.functional.normalize(c, dim=1)[y] * 2.5  # longer than both teacher embeddings
    assert torch.allclose(nd(on_centre, t, y, centers=c, reduction="none"), torch.zeros(2, dtype=F64))
    short = on_centre * 0.4  # length 1: the projection 1 over the teacher's norm
    torch.testing.assert_close(nd(short, t, y, centers=c, reduction="none"),
                               torch.tensor([1 - 1 / math.sqrt(2), 1 - 1 / 2], dtype=F64))


def test_unlabelled_rows_are_left_out_and_a_missing_centre_is_one_line():
    s, t, y, c = make()
    y2 = y.clone()
    y2[0] = -1
    per = nd(s, t, y2, centers=c, reduction="none")
    assert per[0] == 0 and nd(s, t, y2, centers=c) == pytest.approx(float(per[1:].mean()))
    with pytest.raises(ValueError, match="nd_centers"):
        nd(s, t, y)
    with pytest.raises(ValueError, match="adapter"):
        nd(s[:, :3], t, y, centers=c)


def test_gradcheck_float64():
    s, t, y, c = make()
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: nd(a, t, y, centers=c), (s,))


# ---------------------------------------------------------------- the centres callback
D, C, N = 4, 3, 24


class Embed(nn.Module):
    """A linear embedding then a classifier; ``emb`` is the feature ND reads."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Linear(D, D), nn.Linear(D, C)

    def forward(self, x):
        return self.fc(self.emb(x))


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    data = TensorDictDataset("nd", x=torch.randn(N, D, generator=g), label=torch.arange(N) % C)
    torch.manual_seed(seed)
    teacher = Embed()
    distiller = Distiller(Net(Embed(), ("x",), ["emb"]), [Teacher(teacher, ("x",), ["emb"])],
                          [Term("ce"), Term("nd", student="features.emb", teacher="features.emb")], ConstantRouter())
    return data, teacher, distiller


def test_centres_are_the_teachers_class_means_computed_once(tmp_path):
    data, teacher, distiller = setup()
    with torch.no_grad():
        emb = teacher.emb(data.tensors["x"])
    expect = torch.stack([emb[data.tensors["label"] == k].mean(0) for k in range(C)])
    callback = NDCenters()
    res = Trainer(run_dir=tmp_path, max_epochs=2, batch_size=8, tensorboard=False, progress="off").fit(
        distiller, data, data, callbacks=[callback])
    torch.testing.assert_close(callback.centers, expect)
    torch.testing.assert_close(distiller.terms[1].args["centers"], expect)
    assert all(math.isfinite(h["train/nd"]) for h in res.history)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["callbacks"]["NDCenters"]["centers"]
    restored = NDCenters()
    restored.load_state_dict({"centers": saved})
    torch.testing.assert_close(restored.centers, expect)


def test_a_term_without_centres_is_refused(tmp_path):
    data, _, distiller = setup()
    with pytest.raises(ValueError, match=r"callback nd_centers: loss term 'ce' \(loss 'ce'\) takes no centers"):
        Trainer(run_dir=tmp_path, max_epochs=1, batch_size=8, tensorboard=False, progress="off").fit(
            distiller, data, data, callbacks=[NDCenters(term="ce")])
