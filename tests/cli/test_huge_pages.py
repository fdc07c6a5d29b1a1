"""The CLI backs large CPU tensors with transparent huge pages: allocating a tile's temporaries then faults in 2 MiB
pages instead of 4 KiB ones (the kernel's page faults were as much time as a CPU E-step's computation)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

PROGRAM = """
import os, resource, sys
import torch
from cryorefine.cli.main import main
main([])  # no subcommand: prints the help
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    x = torch.empty(32 * 2**20, dtype=torch.float32)
    x.fill_(1.0)
    del x
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(**env) -> tuple[str, int]:
    full = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=full, check=True)
    value, faults = out.stdout.split()[-2:]
    return value, int(faults)


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_large_tensors_fault_in_huge_pages_unless_the_user_says_otherwise():
    value, faults = _run()
    user_value, user_faults = _run(THP_MEM_ALLOC_ENABLE="0")
    assert value == "1" and user_value == "0"
    # 8 x 128 MiB: 262,144 faults on 4 KiB pages, 512 on 2 MiB ones (a few thousand besides for the interpreter)
    assert user_faults > 200_000 and faults < user_faults / 10
