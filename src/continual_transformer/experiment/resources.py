"""What this process uses of the machine, for reports and benchmarks."""

from __future__ import annotations

import resource

_peak_before_window = 0.0  # the process's peak before the current window began (MiB)


def _high_water_mb() -> float:
    """Linux's VmHWM where there is one: `getrusage`'s ru_maxrss survives exec, so a process
    started by a larger one would report its parent's peak."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (windows or not)."""
    return max(_peak_before_window, _high_water_mb())


def start_peak_window() -> bool:
    """Start measuring the peak anew (`window_peak_rss_mb`), e.g. per task of a run: Linux
    resets a process's high-water mark when 5 is written to /proc/self/clear_refs. Returns False
    where that is not possible; the window's peak is then the process's."""
    global _peak_before_window
    _peak_before_window = peak_rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def window_peak_rss_mb() -> float:
    """Peak resident set size since `start_peak_window` (the process's, where it cannot reset)."""
    return _high_water_mb()
