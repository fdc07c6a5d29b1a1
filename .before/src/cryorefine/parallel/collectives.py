"""What ranks exchange after an E-step: summed accumulators, per-particle results, batch counts, rank 0's model state.

Every call is a no-op for one process without a process group. A peer that died or hangs makes the call fail
(gloo: at once on a closed connection, else after the process group's timeout); that becomes one DistributedError line.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from ..errors import DistributedError
from .context import Dist


@contextmanager
def guarded(dist: Dist, what: str):
    """Turn a failed collective or store call into a DistributedError naming this rank."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed's errors (DistError, DistBackendError) are RuntimeErrors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise DistributedError(
            f"rank {dist.rank}: {what} failed: another rank stopped or did not answer within "
            f"{dist.timeout_s:.0f} s ({first})"
        ) from exc


def _each_on_the_wire(tensors: list[torch.Tensor], dist: Dist, what: str, collective) -> None:
    """Run ``collective`` (in place) on each tensor on the backend's device (gloo: host, NCCL: this rank's GPU),
    copying there and back where a tensor lives elsewhere."""
    if not dist.grouped:
        return
    wire = torch.device("cpu" if dist.backend == "gloo" else dist.device)
    with guarded(dist, what):
        for t in tensors:
            buf = t if t.device == wire else t.to(wire)
            collective(buf)
            if buf is not t:
                t.copy_(buf)


def all_reduce_sum_(tensors: list[torch.Tensor], dist: Dist, what: str = "summing the accumulators") -> None:
    """Sum each tensor over ranks, in place."""
    import torch.distributed as tdist

    _each_on_the_wire(tensors, dist, what, tdist.all_reduce)


def merge_rows_(arrays: list[np.ndarray], mine: np.ndarray, dist: Dist) -> None:
    """Give every rank every rank's results: arrays (n,) per-particle values, this rank's at rows ``mine``.

    One all-reduce of an (F+1, n) float64 table holding this rank's rows and zeros elsewhere (exact: each row has one
    contributor; integers below 2**53 survive). The last row counts contributors: a row done twice is a bug.
    """
    if not dist.grouped:
        return
    n = len(arrays[0])
    table = np.zeros((len(arrays) + 1, n))
    table[:-1, mine] = np.stack([a[mine] for a in arrays])
    table[-1, mine] = 1.0
    t = torch.from_numpy(table)
    all_reduce_sum_([t], dist, "gathering the particles' poses")
    table = t.numpy()
    if table[-1].max() > 1:
        raise RuntimeError("a particle batch was processed by two ranks")
    done = table[-1] > 0
    for a, row in zip(arrays, table[:-1]):
        a[done] = row[done].astype(a.dtype)


def per_rank(values: list[float], dist: Dist) -> list[list[float]]:
    """[rank 0's values, rank 1's values, ...] on every rank (a few numbers per rank: batch counts, seconds)."""
    v = torch.zeros(dist.world_size, len(values), dtype=torch.float64)
    v[dist.rank] = torch.tensor(values, dtype=torch.float64)
    all_reduce_sum_([v], dist, "gathering the ranks' counts")
    return v.tolist()


def broadcast_tensors_(
    tensors: list[torch.Tensor], dist: Dist, what: str = "sending the maps to the other ranks"
) -> None:
    """Rank 0's tensors into every rank's tensors of the same shapes, in place: a tensor collective, not a pickle,
    for the model's maps (~130 MB a box-256 iteration)."""
    import torch.distributed as tdist

    _each_on_the_wire(tensors, dist, what, lambda buf: tdist.broadcast(buf, src=0))


def broadcast_from_main(obj, dist: Dist, what: str | None = None):
    """Rank 0's ``obj`` on every rank (pickled; tensors in it must be on the CPU); ``what`` names it in errors."""
    if not dist.grouped:
        return obj
    import torch.distributed as tdist

    box = [obj if dist.is_main else None]
    if what is None:
        what = "sending the model to the other ranks" if dist.is_main else "receiving the model from rank 0"
    with guarded(dist, what):
        tdist.broadcast_object_list(box, src=0, device=torch.device(dist.device) if dist.backend == "nccl" else None)
    return box[0]
