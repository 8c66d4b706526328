"""torch.distributed, when a launcher started us: torchrun, `accelerate launch`, or SLURM's srun.

Nothing here coordinates anything itself: the launcher sets ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (torchrun and
``accelerate launch`` do; under ``srun`` without torchrun, ``SLURM_NTASKS``,
``SLURM_PROCID`` and ``SLURM_LOCALID`` stand in when ``MASTER_ADDR`` is
exported), and :func:`setup` joins PyTorch's own process group: NCCL when the
rank runs on a CUDA GPU (``cuda:LOCAL_RANK``), gloo on CPU. Without those
variables (or with ``WORLD_SIZE=1``) every command runs in one process
exactly as before.

Used by ``embed-images`` (each rank embeds its shard, rank 0 merges) and by
``finetune-lrf`` (DDP; see :mod:`mavl_cli.training.finetune`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mavl_cli.core.errors import MavlError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


_STATE: dict[str, Any] = {"dist": None}


def launch_env(environ: dict[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from the launcher's variables; None when not launched as a group."""
    env = os.environ if environ is None else environ
    try:
        if "WORLD_SIZE" in env:
            world = int(env["WORLD_SIZE"])
            rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", env.get("RANK", "0")))
        elif "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
            world = int(env["SLURM_NTASKS"])
            rank, local = int(env.get("SLURM_PROCID", "0")), int(env.get("SLURM_LOCALID", "0"))
        else:
            return None
    except ValueError:
        raise MavlError("WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers (set by torchrun)") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise MavlError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


def setup(device: str = "auto") -> Dist:
    """Join the launcher's process group (once per process); a one-rank Dist when not launched."""
    if _STATE["dist"] is not None:
        return _STATE["dist"]
    found = launch_env()
    if found is None:
        return Dist()

    rank, world, local = found
    want = (device or "auto").lower()
    on_gpu = want in ("auto", "cuda") and torch.cuda.is_available()
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise MavlError("--device cuda was asked for, but no CUDA GPU is available")
    if on_gpu:
        if local >= torch.cuda.device_count():
            raise MavlError(f"LOCAL_RANK={local}, but this node has {torch.cuda.device_count()} GPU(s); "
                            "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
        dev, backend = f"cuda:{local}", "nccl"
    else:
        dev, backend = "cpu", "gloo"
    if "MASTER_ADDR" not in os.environ:
        raise MavlError("WORLD_SIZE is set but MASTER_ADDR is not; start mavl with torchrun (or export MASTER_ADDR/MASTER_PORT)")
    os.environ.setdefault("MASTER_PORT", "29500")
    timeout = datetime.timedelta(seconds=float(os.environ.get("MAVL_DIST_TIMEOUT", "1800")))
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        except Exception as exc:  # rendezvous failures: one line, not a C++ trace
            raise MavlError(f"rank {rank}: cannot join the process group ({backend}): {_first_line(exc)}") from None
    d = Dist(rank, world, local, dev, backend)
    _STATE["dist"] = d
    return d


def current() -> Dist:
    return _STATE["dist"] or Dist()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def lost_rank_error(d: Dist, exc: BaseException, what: str) -> MavlError:
    return MavlError(f"rank {d.rank}: lost contact with the other ranks {what} (a rank died or was killed?): "
                     f"{_first_line(exc)}; nothing was merged or written")


def all_gather_object(d: Dist, obj: Any, what: str = "while exchanging results") -> list[Any]:
    """Every rank's ``obj`` (pickled), in rank order; a lost rank becomes a MavlError."""
    if not d.active:
        return [obj]

    out: list[Any] = [None] * d.world
    try:
        dist.all_gather_object(out, obj)
    except Exception as exc:
        raise lost_rank_error(d, exc, what) from None
    return out


def gather_to_main(d: Dist, obj: Any, what: str = "while gathering the parts") -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere)."""
    if not d.active:
        return [obj]

    out: list[Any] | None = [None] * d.world if d.main else None
    try:
        dist.gather_object(obj, out, dst=0)
    except Exception as exc:
        raise lost_rank_error(d, exc, what) from None
    return out


def barrier(d: Dist, what: str = "at a barrier") -> None:
    if not d.active:
        return

    try:
        dist.barrier()
    except Exception as exc:
        raise lost_rank_error(d, exc, what) from None


def agree(d: Dist, error: str | None) -> None:
    """Every rank says whether it failed; if any did, every rank stops with the same clear line."""
    if not d.active:
        return
    errors = all_gather_object(d, error, "while checking that every rank finished")
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        r, e = failed[0]
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise MavlError(e if r == d.rank else f"rank {r} failed{more}: {e}; nothing was merged or written")


def all_reduce_sum(d: Dist, tensor: Any) -> Any:
    """In-place sum over ranks (a no-op in one process)."""
    if d.active:
        try:
            dist.all_reduce(tensor)
        except Exception as exc:
            raise lost_rank_error(d, exc, "during training") from None
    return tensor


def exchange_counts(d: Dist, values: list[int], device: Any = "cpu") -> list[list[int]]:
    """Every rank's small list of integers (e.g. readable images in this step), in rank order."""

    if not d.active:
        return [list(values)]
    t = torch.zeros(d.world, len(values), dtype=torch.long, device=device)
    t[d.rank] = torch.tensor(values, dtype=torch.long, device=device)
    return all_reduce_sum(d, t).tolist()


def gather_rows_with_grad(d: Dist, z: Any, counts: list[int]) -> Any:
    """All ranks' ``z`` (rank r holds ``counts[r]`` rows) stacked in rank order, with gradients flowing back.

    Each rank pads its rows to ``max(counts)`` for the collective. The backward
    pass all-reduces (sums) the gradient every rank computed for this rank's
    rows: when every rank evaluates the same loss on the gathered matrix, that
    is ``world`` times the one-process gradient, and DDP's averaging of the
    parameter gradients divides it back, so the penalty trains exactly as in
    one process holding the whole batch.
    """

    if not d.active:
        return z
    rows = max(counts)
    pad = torch.zeros(rows - z.shape[0], *z.shape[1:], dtype=z.dtype, device=z.device)
    full = _GatherRows.apply(torch.cat([z, pad]), d.rank, d.world)
    return torch.cat([full[r * rows : r * rows + counts[r]] for r in range(d.world)])


def _gather_rows_class() -> Any:

    class GatherRows(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, z: Any, rank: int, world: int) -> Any:  # type: ignore[override]
            ctx.rank, ctx.rows = rank, z.shape[0]
            out = [torch.empty_like(z) for _ in range(world)]
            dist.all_gather(out, z.contiguous())
            return torch.cat(out)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:  # type: ignore[override]
            g = grad.contiguous().clone()
            dist.all_reduce(g)
            return g[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None

    return GatherRows


class _Lazy:
    def __init__(self) -> None:
        self.cls = None

    def apply(self, *args: Any) -> Any:
        if self.cls is None:
            self.cls = _gather_rows_class()
        return self.cls.apply(*args)


_GatherRows = _Lazy()
