"""Data-parallel curvature and optimizers on ``torch.distributed`` (KAISA-style; docs/guide/distributed.md).

* :mod:`~tensorcurv.distributed.comm`: process group start (``init``; gloo on CPU, nccl on GPU,
  timeouts), :class:`Comm` collectives with byte/time accounting;
* :mod:`~tensorcurv.distributed.reduce`: what each structure communicates so that every rank's fit
  equals the single-process fit on the global batch;
* :mod:`~tensorcurv.distributed.assignment`: which rank fits/decomposes/solves which layer;
* :class:`DistributedCurvature`: the model-level curvature over a process group.

``resolve(model, comm)`` lets the optimizers accept a ``DistributedDataParallel``-wrapped model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tensorcurv.distributed.assignment import assign
from tensorcurv.distributed.comm import Comm, default_backend, env_world_size, init, shutdown
from tensorcurv.distributed.curvature import DistributedCurvature, world_batch


def resolve(model: nn.Module, comm: Any = None) -> tuple[nn.Module, Comm | None]:
    """``(module, comm)`` for the tensorcurv optimizers.

    A ``DistributedDataParallel`` model is unwrapped (the second-order step captures statistics with
    ``torch.autograd.grad``, which bypasses DDP's gradient hooks; gradients are all-reduced by
    :func:`tensorcurv.distributed.reduce.reduce_gradients` instead, in the same collective as the
    loss), and its process group becomes the :class:`Comm` unless one is given. ``comm=True``: a
    :class:`Comm` on the default process group.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        if comm is None:
            comm = Comm(model.process_group)
        model = model.module
    if comm is True:
        comm = Comm()
    return model, comm


__all__ = [
    "Comm",
    "DistributedCurvature",
    "assign",
    "default_backend",
    "env_world_size",
    "init",
    "resolve",
    "shutdown",
    "world_batch",
]
