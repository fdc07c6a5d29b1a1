"""Particle images kept in GPU memory after their first read, so that later iterations skip the stacks.

Reading a batch of 1,024 images of 256 px from the stacks, checking them for NaNs, pinning and sending them costs
~0.25 s of host time, as much as the GPU needs to score them in the later iterations: without a cache a GPU run is
bound by its reads. The first read is the initial noise spectra's (mstep/noise.initial_sigma2 through ``load`` and
``images``), so the first iteration does not read the stacks a second time. The cache holds the raw images (float32,
as read) on the GPU only, up to a share of its memory (memory.image_cache_bytes), so host memory stays independent of
the number of particles. Images past its capacity are read from their stacks in every iteration, as with no cache. On
the CPU the capacity is 0: everything is read.
With --preread_images every image is also held in host memory, read once before the first iteration: the images the
GPU does not keep come from there instead of the stacks.

Threads: ``load`` runs on the read-ahead thread for the next batch while ``images`` runs on the main thread for the
current one; the two touch the slots of disjoint rows (a particle is in one batch of a pass).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import CryoInputError
from ..transfer import to_device
from .table import ParticleTable, read_images

HOST_SHARE = 0.8  # of the free host memory, at most, for --preread_images


def host_free_bytes() -> int:
    """Free host memory (bytes), 0 where the OS does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on every OS
        return 0


class ImageCache:
    """Up to ``capacity`` images of a table of ``n_rows`` particles, on ``device``, kept in the order first read. Slots
    are ``box`` px, the largest optics group's: a smaller group's image fills a slot's top-left corner."""

    def __init__(self, n_rows: int, box: int, capacity: int, device):
        self.device = torch.device(device)
        self.capacity = max(0, min(int(capacity), n_rows))
        self.slot = np.full(n_rows, -1, dtype=np.int64)  # row → index into data, -1: not cached
        self.data = (
            torch.empty((self.capacity, box, box), dtype=torch.float32, device=self.device) if self.capacity else None
        )
        self.used = 0
        self.host: np.ndarray | None = None  # --preread_images: every image (n_rows, box, box) in host memory

    def preread(self, table: ParticleTable, chunk: int = 1024) -> str:
        """--preread_images: read every image of ``table`` into host memory now (the stacks are not read again);
        returns a line for run.log. One line (CryoInputError) when they would not fit the free host memory."""
        box = self.data.shape[1] if self.data is not None else int(table.boxes.max())
        need = len(table) * box * box * 4
        free = host_free_bytes()
        if free and need > HOST_SHARE * free:
            raise CryoInputError(
                f"--preread_images needs {need / 2**30:.2f} GiB of host memory for {len(table)} images of {box} px "
                f"but {free / 2**30:.2f} GiB are free; drop it (the images are then read batch by batch while the "
                "GPU works) or use --scratch_dir"
            )
        self.host = np.zeros((len(table), box, box), np.float32)
        for b in np.unique(table.boxes):
            rows = np.flatnonzero(table.boxes == b)
            for i in range(0, len(rows), chunk):
                self.host[rows[i : i + chunk], :b, :b] = read_images(table, rows[i : i + chunk])
        return f"--preread_images: {len(table)} images ({need / 2**30:.2f} GiB) in host memory"

    def holds(self, rows: np.ndarray) -> bool:
        """Whether every image of ``rows`` is kept."""
        return bool((self.slot[rows] >= 0).all())

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * 4

    def load(self, table: ParticleTable, rows: np.ndarray) -> tuple[np.ndarray, torch.Tensor | None]:
        """(positions in ``rows`` not cached, their images read from the stacks; pinned for a GPU, None if all
        cached)."""
        missing = np.flatnonzero(self.slot[rows] < 0)
        if len(missing) == 0:
            return missing, None
        pinned = self.device.type == "cuda"  # pinned here, on the reading thread, not on the thread that drives the GPU
        if self.host is not None:
            b = int(table.boxes[rows[0]])
            host = torch.from_numpy(self.host[rows[missing], :b, :b])  # a copy (fancy indexing)
            return missing, host.pin_memory() if pinned else host
        b = int(table.boxes[rows[missing[0]]])
        host = torch.empty((len(missing), b, b), dtype=torch.float32, pin_memory=pinned)  # read straight into it
        read_images(table, rows[missing], out=host.numpy())
        return missing, host

    def images(self, rows: np.ndarray, loaded: tuple[np.ndarray, torch.Tensor | None], box: int) -> torch.Tensor:
        """The images of ``rows`` (len(rows), box, box) on the device (their optics groups' ``box``), from ``load``'s
        result; keeps the newly read ones while there is room."""
        missing, host = loaded
        hit = np.flatnonzero(self.slot[rows] >= 0)  # the complement of ``missing``
        out = None if host is None else to_device(host, self.device)
        keep = 0 if out is None else min(len(missing), self.capacity - self.used)
        if keep:
            assert out is not None and self.data is not None  # keep > 0: images were read and there is room
            slots = np.arange(self.used, self.used + keep)
            self.data[to_device(slots, self.device), :box, :box] = out[:keep]
            self.slot[rows[missing[:keep]]] = slots
            self.used += keep
        if len(hit) == 0:
            assert out is not None  # rows is not empty
            return out
        assert self.data is not None  # hits are cached
        from_cache = self.data[to_device(self.slot[rows[hit]], self.device), :box, :box]
        if out is None:
            return from_cache
        batch = torch.empty((len(rows), *out.shape[1:]), dtype=out.dtype, device=self.device)
        batch[to_device(missing, self.device)] = out
        batch[to_device(hit, self.device)] = from_cache
        return batch
