"""molora.host_memory: freed heap memory goes back to the OS (glibc), which bounds a training run's RSS."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from molora.run.host_memory import _malloc_trim, release_free_memory, resident_bytes

glibc = pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc malloc_trim (Linux)")


@glibc
def test_release_returns_fragmented_heap_memory():
    """Steps of growing tensor sizes with a few blocks kept alive leave freed holes in the heap that glibc keeps;
    after release_free_memory() the resident size drops by most of them. Runs in a fresh interpreter."""
    code = textwrap.dedent("""
        import torch
        from molora.run.host_memory import release_free_memory, resident_bytes
        torch.ones(1)
        base = resident_bytes()
        keep = []
        for step in range(8):  # each "step" allocates bigger activations than the last; a few blocks survive it
            live = [torch.ones(250_000 + step * 25_000) for _ in range(60)]  # 1.0-1.7 MB each
            keep.extend(live[::15])
            del live
        kept = sum(t.numel() * 4 for t in keep)
        before = resident_bytes() - base
        assert release_free_memory()
        after = resident_bytes() - base
        print("MB", kept >> 20, before >> 20, after >> 20)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    kept, before, after = map(int, out.stdout.split("MB")[1].split())
    assert before - kept > 40, (kept, before, after)  # the heap really held on to freed memory
    assert after - kept < 0.25 * (before - kept), (kept, before, after)  # and gave most of it back


def test_resident_bytes_and_release_are_safe_to_call():
    rss = resident_bytes()
    assert rss is None or rss > 10 * 2**20
    assert release_free_memory() in (True, False)


def test_peak_resident_bytes_sees_a_peak_that_is_gone():
    """The logged peak cannot miss a short allocation: a 300 MB buffer freed again still shows in the peak."""
    import gc

    from molora.run.host_memory import peak_resident_bytes, release_free_memory, resident_bytes

    before = peak_resident_bytes()
    if before is None:
        pytest.skip("no getrusage here")
    buf = bytearray(300 * 2**20)
    buf[:: 4096] = b"x" * len(buf[:: 4096])  # touch every page
    during = resident_bytes()
    del buf
    gc.collect()
    release_free_memory()
    peak = peak_resident_bytes()
    assert peak >= during - 16 * 2**20 and peak >= before
    assert resident_bytes() < peak - 200 * 2**20, "the current RSS dropped, the peak kept the high-water mark"
