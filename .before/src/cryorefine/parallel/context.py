"""This process's place in a torchrun job: rank, device, backend (NCCL or gloo) and the shared store.

Without torchrun (no RANK/WORLD_SIZE/MASTER_ADDR in the environment) a run is one process with no process group.
"""

from __future__ import annotations

import os
import signal
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import CryoInputError, DistributedError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Dist:
    """rank of world_size; store: torch.distributed's key-value store (None for one process without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # None: no process group
    timeout_s: float = 600.0
    store: torch.distributed.Store | None = None
    device_peers: int = 1  # ranks on this rank's device (this one included): they share its memory

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return self.backend is not None


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if launched_by_torchrun() else 0


def rank_device(gpu: str | None, local: int, n_cuda: int) -> str:
    """This rank's device from --gpu: None → cpu; '' (bare --gpu) → GPU LOCAL_RANK (mod the visible GPUs);
    'i,j,...' → the LOCAL_RANK-th id of the list (mod its length), so '--gpu 0' puts every rank on GPU 0."""
    if gpu is None:
        return "cpu"
    if n_cuda == 0:
        raise CryoInputError("--gpu given but no CUDA device is visible; drop --gpu to run on the CPU")
    ids = [s.strip() for s in str(gpu).split(",") if s.strip()]
    return f"cuda:{ids[local % len(ids)]}" if ids else f"cuda:{local % n_cuda}"


def choose_backend(devices: list[str]) -> str:
    """devices: 'host/device' of every rank. NCCL needs one GPU per rank; gloo for CPUs and ranks sharing a GPU."""
    on_gpu = all(d.split("/", 1)[1].startswith("cuda") for d in devices)
    return "nccl" if on_gpu and len(set(devices)) == len(devices) else "gloo"


def _stopped_by_launcher(signum, frame):
    raise DistributedError(
        f"rank {os.environ.get('RANK', '?')}: stopped by torchrun ({signal.Signals(signum).name}), most likely because "
        "another rank failed (torchrun's report names it)"
    )


@contextmanager
def distributed(device: str, timeout_s: float = 600.0):
    """Yield this process's Dist: under torchrun, a process group on every rank (even a world of one), else one
    process."""
    if not launched_by_torchrun():
        yield Dist(device=device, timeout_s=timeout_s)
        return
    import torch.distributed as tdist
    from torch.distributed.rendezvous import rendezvous

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=timeout_s)
    previous = signal.signal(signal.SIGTERM, _stopped_by_launcher)
    try:
        store, _, _ = next(rendezvous("env://", rank, world, timeout=timeout))
        # every rank's device decides the backend (the same decision on every rank)
        store.set(f"cryorefine/device/{rank}", f"{socket.gethostname()}/{device}")
        devices = [store.get(f"cryorefine/device/{r}").decode() for r in range(world)]
    except RuntimeError as exc:
        raise DistributedError(
            f"rank {rank}: could not join the torchrun job within {timeout_s:.0f} s ({str(exc).splitlines()[0][:160]})"
        ) from exc
    backend = choose_backend(devices)
    if backend == "nccl":
        torch.cuda.set_device(device)
        os.environ.setdefault(
            "TORCH_NCCL_BLOCKING_WAIT", "1"
        )  # a timed-out collective raises here instead of aborting the process
    tdist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        yield Dist(
            rank, world, int(os.environ["LOCAL_RANK"]), device, backend, timeout_s, store, devices.count(devices[rank])
        )
    except CryoInputError:
        # a refusal (e.g. refine/context.output_lock's, which every rank raises together): leave the group as on
        # success, so that the rank exits with its one line and code 2, not an abort in the group's teardown
        signal.signal(signal.SIGTERM, previous)
        tdist.destroy_process_group()
        raise
    # reached only on success: after a failure the process exits and torchrun stops the others
    signal.signal(signal.SIGTERM, previous)
    tdist.destroy_process_group()
