"""A user-defined router, registered by name and run through the same Trainer from Python and from
a config.

    python examples/custom_router.py [student epochs]     # from Python (this file's main())
    mmkd run experiment=custom_router                      # from the config, in the repository root

``configs/experiment/custom_router.yaml`` lists ``imports: [examples.custom_router]``: the module is
imported before the config's names are checked, which registers ``teacher_entropy``.
"""
import torch

from mmkd.routers import Router, register_router


@register_router("teacher_entropy")
class TeacherEntropyRouter(Router):
    """``w[b, t] = softmax_t(-H[b, t] / tau)`` with ``H[b, t] = -sum_c p log p`` the entropy of
    teacher t's prediction on instance b: the surer a teacher is of an instance, the more it weighs."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student, teachers, batch):
        logp = torch.stack([t.logits.float().log_softmax(1) for t in teachers], 1)  # [batch, teachers, classes]
        entropy = -(logp.exp() * logp).sum(2)
        return (-entropy / self.temperature).softmax(1)


def main(run_dir: str = "runs/custom_router", epochs: int = 300, teacher_epochs: int = 40) -> dict:
    """Train a CNN and an MLP teacher on digits, distil both into a small MLP with the router above,
    and return the student's test metrics (the Python twin of ``experiment=custom_router``)."""
    from mmkd import Distiller, Net, Teacher, Term, Trainer, cache_teacher
    from mmkd.data import digits
    from mmkd.models import CNN, MLP

    torch.manual_seed(0)
    data, shape = digits(), (1, 8, 8)
    teachers = []
    for name, model in (("cnn", CNN(10, shape, channels=(32, 64, 128), dropout=0.1)),
                        ("mlp", MLP(10, shape, hidden=(256, 256), dropout=0.1))):
        Trainer(run_dir=f"{run_dir}/teachers/{name}", max_epochs=teacher_epochs, lr=3e-3).fit(
            Distiller(Net(model, ["image"]), [], [Term("ce")]), data.train, data.val)
        teachers.append(cache_teacher(Teacher(model, ["image"]), data.train, f"{run_dir}/cache"))
    student = Net(MLP(10, shape, hidden=(64,), dropout=0.1), ["image"])
    kd = Distiller(student, teachers, [Term("ce"), Term("kd", args={"temperature": 4.0})], TeacherEntropyRouter())
    trainer = Trainer(run_dir=f"{run_dir}/student", max_epochs=epochs, lr=3e-3, weight_decay=1e-4)
    trainer.fit(kd, data.train, data.val)
    return trainer.evaluate(kd, data.test)


if __name__ == "__main__":
    import sys

    print(main(epochs=int(sys.argv[1]) if len(sys.argv) > 1 else 300))
