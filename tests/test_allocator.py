"""The command's allocator settings: freed blocks stay in the process during a pass and go
back to the system when it ends."""

import os
import platform

import pytest
import torch

from hfrepair.allocator import keep_freed_memory, release_freed_memory


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_kept_until_the_pass_releases_them():
    assert keep_freed_memory()
    blocks = [torch.ones(250_000) for _ in range(200)]  # 200 blocks of 1 MB, touched
    held = resident_mb()
    del blocks
    kept = resident_mb()
    release_freed_memory()
    released = resident_mb()
    assert kept > held - 20  # freed, but kept for the next batch
    assert released < kept - 150  # handed back when the pass ends
