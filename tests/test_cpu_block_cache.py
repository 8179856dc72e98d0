"""The CPU block cache (ovfast/ops/cpu_block_cache.cpp): torch's large CPU tensors come back from
blocks freed earlier instead of fresh pages.

Process-wide like any allocator: each test sets the limit it needs and the fixture puts the
default back (a CPU engine installs the cache at load anyway). Counters are compared as deltas.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys

import pytest
import torch

from ovfast.ops import cpu_native

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("g++") is None,
                                reason="the CPU kernels (and the cache with them) are built with g++ on x86-64")

MiB = 1 << 20
PAGE = 2 * MiB


@pytest.fixture
def cache():
    cpu_native.keep_freed_blocks(0)  # empty: each test starts with nothing cached
    assert cpu_native.keep_freed_blocks(256) is True
    yield cpu_native.block_cache_stats
    cpu_native.keep_freed_blocks()


def _mib(n: float) -> torch.Tensor:
    """A float32 tensor of n MiB, filled (so its pages are really used)."""
    return torch.full((int(n * MiB) // 4,), 1.0)


def test_a_freed_block_is_handed_out_again(cache):
    a = _mib(8)
    ptr = a.data_ptr()
    assert ptr % PAGE == 0  # whole 2 MiB pages, aligned for huge pages
    before = cache()
    del a
    assert cache()["cached_bytes"] - before["cached_bytes"] == 8 * MiB
    b = torch.empty(int(7.5 * MiB) // 4)  # a little smaller fits the same block
    after = cache()
    assert b.data_ptr() == ptr and after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    b.copy_(torch.arange(b.numel(), dtype=torch.float32))  # the reused block holds what is written
    assert torch.equal(b[-3:], torch.tensor([b.numel() - 3.0, b.numel() - 2.0, b.numel() - 1.0]))


def test_small_allocations_bypass_it(cache):
    before = cache()
    xs = [torch.randn(1000) for _ in range(10)] + [torch.empty(cpu_native.BLOCK_CACHE_MIN_BYTES - 4, dtype=torch.uint8)]
    after = cache()
    assert (after["hits"], after["misses"], after["used_bytes"]) == (before["hits"], before["misses"], before["used_bytes"])
    del xs


def test_a_much_larger_block_is_not_wasted_on_a_small_request(cache):
    big = _mib(64)
    big_ptr = big.data_ptr()
    del big
    before = cache()
    small = _mib(8)  # 8 MiB must not take the 64 MiB block
    after = cache()
    assert small.data_ptr() != big_ptr and after["misses"] == before["misses"] + 1
    assert after["cached_bytes"] == before["cached_bytes"]


def test_the_limit_drops_the_least_recently_freed(cache):
    cpu_native.keep_freed_blocks(40)  # MiB
    a, b, c = _mib(16), _mib(16), _mib(16)
    ptr_b, ptr_c = b.data_ptr(), c.data_ptr()
    del a, b, c  # freed in this order: a, the oldest, goes back to the system
    stats = cache()
    assert stats["cached_bytes"] == 32 * MiB and stats["cached_blocks"] == 2
    assert _mib(16).data_ptr() in (ptr_b, ptr_c)


def test_a_block_above_the_limit_is_never_cached(cache):
    cpu_native.keep_freed_blocks(8)
    before = cache()
    x = _mib(20)
    del x
    assert cache()["cached_bytes"] == before["cached_bytes"] <= 8 * MiB


def test_zero_empties_it_and_leaves_torch_allocating(cache):
    live = _mib(12)
    _mib(10)  # freed at once: cached
    assert cache()["cached_bytes"] >= 10 * MiB
    assert cpu_native.keep_freed_blocks(0) is False
    stats = cache()
    assert stats["cached_bytes"] == 0 and stats["cached_blocks"] == 0
    x = _mib(30)  # torch's allocator now
    assert cache()["used_bytes"] == stats["used_bytes"]
    live.add_(1)  # a block handed out before stays valid, and is unmapped when freed
    assert live[0].item() == 2.0
    del live, x
    assert cache()["used_bytes"] == stats["used_bytes"] - 12 * MiB


def test_results_are_the_same_with_and_without_it(cache):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1500, 1200, generator=g), torch.randn(1200, 1700, generator=g)
    with_cache = [a @ b for _ in range(3)]  # the later products land in blocks the first ones freed
    cpu_native.keep_freed_blocks(0)
    without = a @ b
    for got in with_cache:
        assert torch.equal(got, without)


def test_an_engine_keeps_the_size_the_process_chose(cache):
    # default_block_cache (what a CPU engine's load calls) must not undo keep_freed_blocks
    cpu_native.keep_freed_blocks(0)
    assert cpu_native.default_block_cache() is False
    before = cache()
    x = _mib(12)
    assert cache()["used_bytes"] == before["used_bytes"]  # still torch's allocator
    del x
    cpu_native.keep_freed_blocks(64)
    assert cpu_native.default_block_cache() is True
    y = _mib(12)
    assert cache()["used_bytes"] == before["used_bytes"] + 12 * MiB
    del y


def test_negative_limit_is_refused(cache):
    with pytest.raises(ValueError, match="limit_mb"):
        cpu_native.keep_freed_blocks(-1)


def test_the_variable_sets_it_and_zero_never_installs_it():
    # Fresh processes: default_block_cache() (a CPU engine's load) reads OVFAST_CPU_BLOCK_CACHE_MB;
    # at 0 the cache is never installed at all.
    code = ("from ovfast.ops import cpu_native as c; import torch; on = c.default_block_cache(); "
            "x = torch.empty(16 << 20, dtype=torch.uint8); print(on, c.block_cache_stats()['used_bytes'] >= 16 << 20)")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OVFAST_CPU_BLOCK_CACHE_MB": "0"})
    assert on.returncode == 0 and on.stdout.split() == ["True", "True"], on.stderr[-2000:]
    assert off.returncode == 0 and off.stdout.split() == ["False", "False"], off.stderr[-2000:]


def test_engine_info_reports_it(engines):
    stats = engines["tiny"].info()["cpu_block_cache"]
    assert set(stats) == {"cached_bytes", "used_bytes", "hits", "misses", "cached_blocks"}
    assert all(isinstance(v, int) and v >= 0 for v in stats.values())
