"""Routers: per-instance weights over the teachers of a mixture, shape ``[batch, teachers]``.

Write your own by subclassing :class:`Router` and registering it::

    from mmkd.routers import Router, register_router

    @register_router("entropy")
    class EntropyRouter(Router):
        def forward(self, student, teachers, batch):
            ent = torch.stack([-(t.logits.softmax(1) * t.logits.log_softmax(1)).sum(1) for t in teachers], 1)
            return (-ent).softmax(dim=1)  # confident (low-entropy) teachers weigh more
"""
from mmkd.routers.base import Router, register_router
from mmkd.routers.confidence import ConfidenceRouter
from mmkd.routers.constant import ConstantRouter

__all__ = ["Router", "register_router", "ConstantRouter", "ConfidenceRouter"]
