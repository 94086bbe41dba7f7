"""Process-group helpers: start/stop ``torch.distributed``, pick the backend, and the few
collectives the distributed curvature needs (flat-buffer all-reduce, broadcast, gather to an owner).

Backend: ``nccl`` when the tensors live on a CUDA device, ``gloo`` otherwise (CPU). Every collective
runs under the process group's ``timeout`` (default 5 minutes; tests use seconds), so a rank that
died or took another code path raises ``RuntimeError`` on the others instead of hanging.

Flat buffers: many small tensors are concatenated into one 1-D buffer so that one step costs one
collective (latency) and the volume is exactly the sum of the tensor sizes.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 300.0


def default_backend(device: str | torch.device | None = None) -> str:
    """``nccl`` for CUDA devices (or, with ``device=None``, when CUDA is available), else ``gloo``."""
    if device is None:
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(
    backend: str = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    **comm_options: Any,
) -> Comm:
    """Initialise the default process group (idempotent) and return a :class:`Comm` for it.

    Without ``rank``/``world_size`` the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``) is read. ``backend="auto"``: see
    :func:`default_backend`; with ``nccl`` the process binds to GPU ``LOCAL_RANK``.
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        if backend == "auto":
            backend = default_backend()
        if backend not in ("gloo", "nccl", "mpi"):
            raise ValueError(f"unknown backend {backend!r}; valid: auto, gloo, nccl, mpi")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kw: dict[str, Any] = {"backend": backend, "timeout": _dt.timedelta(seconds=timeout_s)}
        if rank is not None:
            kw.update(rank=rank, world_size=world_size)
        if init_method is not None:
            kw["init_method"] = init_method
        dist.init_process_group(**kw)
    return Comm(**comm_options)


def shutdown() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def env_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` / SLURM launchers (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Comm:
    """A process group plus byte/time accounting of every collective issued through it.

    ``comm_dtype``: optional lower precision (e.g. ``torch.float32``, ``torch.bfloat16``) for the
    *results* that are broadcast (fitted factors of gathered structures, preconditioned gradients);
    statistics are always reduced in the working precision. ``assignment`` (``cost`` or
    ``round_robin``) and ``solve_mode`` (``owner`` or ``local``) are the defaults of every
    :class:`~tensorcurv.distributed.DistributedCurvature` built on this group.
    """

    def __init__(
        self,
        group: Any = None,
        comm_dtype: torch.dtype | str | None = None,
        assignment: str = "cost",
        solve_mode: str = "owner",
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialised; call tensorcurv.distributed.init() "
                "(or torch.distributed.init_process_group) first"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        if isinstance(comm_dtype, str):
            comm_dtype = None if comm_dtype in ("", "none", "null") else getattr(torch, comm_dtype)
        self.comm_dtype = comm_dtype
        self.assignment, self.solve_mode = assignment, solve_mode
        self.reset_counters()

    # ------------------------------------------------------------------ accounting
    def reset_counters(self) -> None:
        self.bytes = 0  # payload bytes this rank sent into collectives
        self.seconds = 0.0  # wall time spent inside collectives (waiting included)
        self.calls = 0

    def _account(self, t0: float, nbytes: int) -> None:
        self.seconds += time.perf_counter() - t0
        self.bytes += nbytes
        self.calls += 1

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Element-wise sums over ranks of ``tensors`` (one collective on a flat buffer); new tensors."""
        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1) for t in tensors])
        t0 = time.perf_counter()
        dist.all_reduce(flat, group=self.group)
        self._account(t0, flat.numel() * flat.element_size())
        return _split(flat, tensors)

    def all_gather_int(self, x: int) -> list[int]:
        """``[x_0, ..., x_{W-1}]`` from every rank."""
        buf = torch.zeros(self.world_size, dtype=torch.int64, device=self._device())
        buf[self.rank] = int(x)
        t0 = time.perf_counter()
        dist.all_reduce(buf, group=self.group)
        self._account(t0, buf.numel() * 8)
        return [int(v) for v in buf.tolist()]

    def broadcast(self, tensors: Sequence[Tensor], src: int, dtype: torch.dtype | None = None) -> list[Tensor]:
        """The ``src`` rank's ``tensors`` on every rank (shapes must agree), optionally sent as ``dtype``."""
        if not tensors:
            return []
        work = dtype or tensors[0].dtype
        flat = torch.cat([t.reshape(-1).to(work) for t in tensors])
        t0 = time.perf_counter()
        dist.broadcast(flat, src=self._global(src), group=self.group)
        self._account(t0, flat.numel() * flat.element_size() if self.rank == src else 0)
        return _split(flat.to(tensors[0].dtype), tensors)

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """Any picklable object (dict of tensors, state dicts) from ``src`` to every rank."""
        box = [obj if self.rank == src else None]
        t0 = time.perf_counter()
        dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        nbytes = _tensor_bytes(obj) if self.rank == src else 0
        self._account(t0, nbytes)
        return box[0]

    def gather_rows(self, t: Tensor, dst: int, sizes: Sequence[int]) -> Tensor | None:
        """Concatenate every rank's ``t`` (``(sizes[r], *rest)``) along dim 0 in rank order on ``dst``;
        other ranks get ``None``. Rows are padded to ``max(sizes)`` for the collective."""
        rest = t.shape[1:]
        width = max(sizes)
        buf = t.new_zeros((width, *rest))
        buf[: t.shape[0]] = t
        bufs = [torch.empty_like(buf) for _ in range(self.world_size)] if self.rank == dst else None
        t0 = time.perf_counter()
        if self.backend == "nccl":  # nccl has no gather: all-gather instead
            bufs = [torch.empty_like(buf) for _ in range(self.world_size)]
            dist.all_gather(bufs, buf, group=self.group)
        else:
            dist.gather(buf, bufs, dst=self._global(dst), group=self.group)
        self._account(t0, buf.numel() * buf.element_size() if self.rank != dst else 0)
        if self.rank != dst:
            return None
        assert bufs is not None
        return torch.cat([b[:n] for b, n in zip(bufs, sizes)])

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        t0 = time.perf_counter()
        dist.all_gather_object(out, obj, group=self.group)
        self._account(t0, 0)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r})"


def _split(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for t in like:
        out.append(flat[i : i + t.numel()].view(t.shape).clone())
        i += t.numel()
    return out


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0
