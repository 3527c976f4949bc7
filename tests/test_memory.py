"""Process memory that is not tensors: the CPU kernel caches are bounded unless the user says
otherwise, and freed memory is handed back."""

import os

from continual_transformer.model.memory import (
    KERNEL_CACHE_ENTRIES,
    KERNEL_CACHE_VARIABLES,
    bound_kernel_caches,
    release_freed_memory,
)


def test_kernel_caches_are_bounded_unless_the_user_set_them(monkeypatch):
    first, second = KERNEL_CACHE_VARIABLES
    monkeypatch.delenv(first, raising=False)
    monkeypatch.setenv(second, "7")
    bound_kernel_caches()
    assert os.environ[first] == str(KERNEL_CACHE_ENTRIES)
    assert os.environ[second] == "7"  # the user's value stands


def test_loading_a_backbone_bounds_the_caches(tiny_config, monkeypatch):
    from continual_transformer.model.backbone import Backbone

    for name in KERNEL_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    Backbone.load(tiny_config, "cpu")
    assert all(os.environ[name] == str(KERNEL_CACHE_ENTRIES) for name in KERNEL_CACHE_VARIABLES)


def test_release_freed_memory_returns_freed_blocks():
    def rss_pages():
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1])

    blocks = [bytearray(64 * 1024) for _ in range(2000)]  # 128 MiB of small heap blocks
    for block in blocks[::2]:
        block[:] = b"\1" * len(block)
    before = rss_pages()
    del blocks[1::2]  # half freed, interleaved with live ones: free() alone keeps them
    release_freed_memory()
    after = rss_pages()
    assert (before - after) * os.sysconf("SC_PAGE_SIZE") > 32 * 2**20


def test_rate_limited_release_runs_at_most_once_per_interval(monkeypatch):
    from continual_transformer.model import memory

    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(memory, "_last_release", [0.0])
    for _ in range(50):
        memory.release_freed_memory_at_most_every(3600.0)
    assert len(calls) == 1
    memory.release_freed_memory_at_most_every(0.0)
    assert len(calls) == 2


def test_a_peak_window_forgets_an_earlier_high_but_the_process_peak_keeps_it():
    from continual_transformer.experiment.resources import (peak_rss_mb, start_peak_window,
                                                            window_peak_rss_mb)
    import numpy as np

    block = np.ones(300 * 2**20 // 8)  # 300 MiB touched, then freed
    del block
    process_peak = peak_rss_mb()
    assert start_peak_window(), "Linux resets the high-water mark through /proc/self/clear_refs"
    assert window_peak_rss_mb() < process_peak - 200
    assert peak_rss_mb() >= process_peak
