"""trainer.strategy=fsdp: two CPU processes on gloo (torch.distributed.run) train a tiny GPT-2 student
with a frozen GPT-2 teacher and a learned adapter-free router-free KD term. The same fit under DDP and
under FSDP must end with the same weights (both average the same gradients; FSDP shards them), every
process must hold only half of each sharded parameter during the fit, checkpoints must hold full
(unsharded) tensors, and a fit cut after one epoch and resumed under FSDP must end where the uncut one
does."""
import textwrap

import pytest
import torch
import torch.distributed as dist

from tests.reference import torchrun

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build")

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from torch.distributed.tensor import DTensor
    from mmkd import Distiller, Net, Teacher, Term, Trainer
    from mmkd.modalities.lm.models import causal_lm
    from mmkd.modalities.lm.corpus import stream
    from mmkd.routers import ConstantRouter

    torch.set_num_threads(1)
    rank, out = int(os.environ["RANK"]), sys.argv[1]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 23, (8 * 16 + 1,), generator=g)
    train, val = stream("train", tokens, 8), stream("val", tokens[:33], 8)

    def module():
        torch.manual_seed(7)
        teacher = Teacher(causal_lm(23, (8,), n_layer=1, n_embd=16, n_head=2), ("input_ids",), tokens="mask")
        student = Net(causal_lm(23, (8,), n_layer=2, n_embd=16, n_head=2), ("input_ids",), tokens="mask")
        return Distiller(student, [teacher], [Term("ce", 0.5), Term("fkl", 0.5)], router=ConstantRouter())

    shards = []  # per step: whether a student weight is sharded, and its local shape
    from mmkd.callbacks import Callback
    class Local(Callback):
        def on_step_end(self, trainer, mod, losses):
            w = mod.student.model.lm.transformer.h[0].mlp.c_fc.weight
            shards.append((isinstance(w, DTensor), tuple(w.to_local().shape) if isinstance(w, DTensor) else None))

    def fit(strategy, name, epochs=2, resume=False, crash=False):
        mod = module()
        cbs = [Local()]
        if crash:
            class Stop(Callback):
                def on_epoch_end(self, trainer, m, metrics):
                    raise KeyboardInterrupt
            cbs.append(Stop())
        t = Trainer(run_dir=os.path.join(out, name), max_epochs=epochs, batch_size=4, lr=0.01, grad_clip=1.0,
                    progress="off", tensorboard=False, device="cpu", strategy=strategy, resume=resume)
        try:
            res = t.fit(mod, train, val, cbs)
        except KeyboardInterrupt:
            return None
        return {"state": {k: v.clone() for k, v in mod.state_dict().items()}, "history": res.history,
                "eval": t.evaluate(mod, val)}

    ddp = fit("ddp", "ddp")
    sharded = fit("fsdp", "fsdp")
    seen = list(shards)
    fit("fsdp", "cut", crash=True)
    resumed = fit("fsdp", "cut", resume=True)
    torch.save({"ddp": ddp, "fsdp": sharded, "resumed": resumed, "shards": seen}, os.path.join(out, f"rank{rank}.pt"))
""")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    rc, log = torchrun(SCRIPT, out, "train_fsdp", timeout=240)
    assert rc == 0, log[-4000:]
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_fsdp_ends_where_ddp_does(fsdp_run):
    out, (r0, r1) = fsdp_run
    for k, v in r0["ddp"]["state"].items():
        assert torch.allclose(r0["fsdp"]["state"][k], v, atol=1e-5), k
        assert torch.equal(r0["fsdp"]["state"][k], r1["fsdp"]["state"][k]), k  # both processes: the full weights
    for a, b in zip(r0["ddp"]["history"], r0["fsdp"]["history"]):
        assert a["val/loss"] == pytest.approx(b["val/loss"], abs=1e-5)
    assert r0["fsdp"]["eval"]["loss"] == pytest.approx(r0["ddp"]["eval"]["loss"], abs=1e-5)


def test_fsdp_holds_half_of_each_sharded_weight(fsdp_run):
    out, (r0, r1) = fsdp_run
    ddp_steps = len(r0["ddp"]["history"]) * 2  # 16 blocks / (2 processes x 4) per epoch
    assert all(s == (False, None) for s in r0["shards"][:ddp_steps])  # DDP: plain tensors
    assert all(s == (True, (8, 64)) for s in r0["shards"][ddp_steps:])  # FSDP: half of GPT-2's Conv1D [16, 64]


def test_fsdp_checkpoints_are_full_and_resume_exactly(fsdp_run):
    out, (r0, r1) = fsdp_run
    last = torch.load(out / "fsdp" / "last.pt", weights_only=True)
    best = torch.load(out / "fsdp" / "best.pt", weights_only=True)
    for k, v in r0["fsdp"]["state"].items():
        assert last["model"][k].shape == v.shape, k
        assert best["model"][k].shape == v.shape, k
    assert r0["resumed"] is not None
    for k, v in r0["fsdp"]["state"].items():
        assert torch.allclose(r0["resumed"]["state"][k], v, atol=1e-6), k
