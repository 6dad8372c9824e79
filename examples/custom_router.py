"""A custom router: registered by name, run by the same Trainer from Python (`python examples/custom_router.py`)
and from a config (`mmkd run experiment=custom_router`, whose `imports: [examples.custom_router]` registers it)."""
import torch

from mmkd import Distiller, Net, Teacher, Term, Trainer, cache_teacher
from mmkd.data import digits
from mmkd.models import CNN, MLP
from mmkd.routers import Router, register_router


@register_router("teacher_entropy")
class TeacherEntropyRouter(Router):
    """``w[b, t] = softmax_t(-H[b, t] / tau)``, ``H[b, t]`` the entropy of teacher t's prediction on instance b."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student, teachers, batch):
        logp = torch.stack([t.logits.float().log_softmax(1) for t in teachers], 1)  # [batch, teachers, classes]
        return ((logp.exp() * logp).sum(2) / self.temperature).softmax(1)


def main(run_dir="runs/custom_router", epochs=300, teacher_epochs=40):
    """Two teachers (CNN, MLP) on digits, distilled into a small MLP through the router above."""
    data, shape = digits(), (1, 8, 8)

    def fit(module, name, max_epochs):
        trainer = Trainer(run_dir=f"{run_dir}/{name}", max_epochs=max_epochs, lr=3e-3)
        trainer.fit(module, data.train, data.val)
        return trainer

    teachers = [CNN(10, shape, channels=(32, 64, 128), dropout=0.1), MLP(10, shape, hidden=(256, 256), dropout=0.1)]
    for i, model in enumerate(teachers):
        fit(Distiller(Net(model, ["image"]), [], [Term("ce")]), f"teachers/{i}", teacher_epochs)
    cached = [cache_teacher(Teacher(model, ["image"]), data.train, f"{run_dir}/cache") for model in teachers]
    kd = Distiller(Net(MLP(10, shape, hidden=(64,), dropout=0.1), ["image"]), cached,
                   [Term("ce"), Term("kd", args={"temperature": 4.0})], TeacherEntropyRouter())
    return fit(kd, "student", epochs).evaluate(kd, data.test)


if __name__ == "__main__":
    print(main())
