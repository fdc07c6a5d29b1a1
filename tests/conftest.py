"""Shared fixtures; shared test helpers live in this folder (e.g. cs_project.py), which pytest puts on sys.path.

``device`` and ``dtype`` parametrise a test over every device (CUDA where there is one: marked gpu, skipped without
it) and over float32 and float64; a test that takes both runs on every pair (stacked, not zipped)."""

import pytest
import torch

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=DTYPES)
def dtype(request) -> torch.dtype:
    return request.param
