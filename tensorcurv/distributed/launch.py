"""Glue between a training loop and the process group (used by ``tensorcurv.experiments.runner``).

    session = launch.setup(cfg.get("distributed"))   # None/enabled=false: single process, no-op
    model_for_opt, extra = session.for_optimizer(model, optimizer_name)
    opt = optim.build(name, model_for_opt, loss_fn, **kwargs, **extra)
    opt.step(session.shard(X_batch), session.shard(Y_batch))   # every rank: its share of the batch
    if session.is_main: log / checkpoint

Second-order optimizers get ``comm=`` (statistics, gradients and loss reduced by tensorcurv);
first-order baselines get the model wrapped in ``DistributedDataParallel`` (torch's own gradient
averaging, which assumes equal shards: keep ``batch_size`` divisible by the world size).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from tensorcurv.distributed.comm import DEFAULT_TIMEOUT_S, Comm, default_backend, init, shutdown
from tensorcurv.distributed.curvature import world_batch

SECOND_ORDER = ("natural_gradient", "gauss_newton")


@dataclass
class DistributedConfig:
    enabled: bool = False
    """Start/join a process group (``torchrun`` env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    backend: str = "auto"
    """``auto`` (nccl on GPU, gloo on CPU), ``gloo``, ``nccl``."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    """Collective timeout: a dead or stuck rank raises on the others after this long."""
    assignment: str = "cost"
    """Owner of each layer's fit/solve: ``cost`` (balanced by flop estimate) or ``round_robin``."""
    solve_mode: str = "owner"
    """``owner``: owners solve, one all-reduce of preconditioned gradients; ``local``: every rank solves."""
    comm_dtype: str | None = None
    """Lower precision for broadcast results (``float32``, ``bfloat16``); null: working precision."""

    def __post_init__(self) -> None:
        for key, val, valid in (
            ("backend", self.backend, ("auto", "gloo", "nccl", "mpi")),
            ("assignment", self.assignment, ("cost", "round_robin")),
            ("solve_mode", self.solve_mode, ("owner", "local")),
            ("comm_dtype", self.comm_dtype, (None, "float32", "float16", "bfloat16", "float64")),
        ):
            if val not in valid:
                raise ValueError(f"distributed.{key}={val!r} is not one of {list(valid)}")
        if not self.timeout_s > 0:
            raise ValueError(f"distributed.timeout_s must be > 0, got {self.timeout_s!r}")


def make_config(raw: Any) -> DistributedConfig:
    """From a ``distributed`` config group (dict/DictConfig/None); one-line error on unknown keys."""
    d = dict(raw or {})
    valid = [f.name for f in fields(DistributedConfig)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"distributed: unknown key(s) {unknown}; valid keys: {valid}")
    return DistributedConfig(**d)


class Session:
    """Rank, world size and the helpers a training loop needs; single-process when ``comm is None``."""

    def __init__(self, comm: Comm | None = None) -> None:
        self.comm = comm
        self.rank = comm.rank if comm is not None else 0
        self.world_size = comm.world_size if comm is not None else 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs (W&B, CSV, figures) and writes checkpoints."""
        return self.rank == 0

    def shard(self, x: Tensor) -> Tensor:
        """This rank's contiguous share of a global batch (the whole batch without a group)."""
        return x if self.comm is None else world_batch(x, self.rank, self.world_size)

    def for_optimizer(self, model: nn.Module, name: str) -> tuple[nn.Module, dict[str, Any]]:
        """``(model to pass, extra kwargs)`` for ``tensorcurv.optim.build``."""
        if self.comm is None:
            return model, {}
        if name in SECOND_ORDER:
            return model, {"comm": self.comm}
        return nn.parallel.DistributedDataParallel(model, process_group=self.comm.group), {}

    def check_batch(self, batch_size: int) -> None:
        if self.comm is not None and batch_size < self.world_size:
            raise ValueError(f"batch_size={batch_size} is smaller than the world size {self.world_size}")

    def close(self) -> None:
        if self.comm is not None:
            shutdown()


def setup(raw: Any = None, device: str | torch.device = "cpu") -> Session:
    """Start the process group if ``distributed.enabled`` (else a single-process session).
    ``backend=auto`` picks from the training ``device``: nccl for CUDA, gloo otherwise."""
    cfg = raw if isinstance(raw, DistributedConfig) else make_config(raw)
    if not cfg.enabled:
        return Session(None)
    backend = default_backend(device) if cfg.backend == "auto" else cfg.backend
    comm = init(backend, cfg.timeout_s, comm_dtype=cfg.comm_dtype, assignment=cfg.assignment, solve_mode=cfg.solve_mode)
    return Session(comm)
