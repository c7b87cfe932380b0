"""A server's process tree from /proc: CPU-seconds, resident memory and its peak.

Every measure covers the process and its live descendants (uvicorn's workers), so a
server with several workers is measured whole."""

import os
import threading
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn's workers)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its live descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def _status_kib(pid: int, field: str) -> int:
    """One `kB` field of /proc/PID/status (VmRSS, VmHWM); 0 for a process gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` and its live descendants, KiB."""
    return sum(_status_kib(p, "VmRSS") for p in process_tree(pid))


def rss_mib(pid: int) -> float:
    return round(rss_kib(pid) / 1024, 1)


class PeakGrowth:
    """Peak RSS growth of a process tree over a `with` block, in KiB.

    Each process's peak (VmHWM) is reset to its current RSS on entry (`clear_refs`,
    Linux 4.0+) and read on exit: the growth is the sum over the processes of peak minus
    start, so a spike between two reads is not missed. Where the reset is refused, a
    thread samples the tree's RSS every `interval` seconds instead (`method` says which).
    """

    def __init__(self, pid: int, interval: float = 0.002) -> None:
        self.pid, self.interval = pid, interval
        self.kib = 0
        self.method = "VmHWM"
        self._start: dict[int, int] = {}
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> "PeakGrowth":
        self._start = {p: _status_kib(p, "VmRSS") for p in process_tree(self.pid)}
        try:
            for p in self._start:
                Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            self.method = "sampled RSS"
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        start = sum(self._start.values())
        while not self._stop.is_set():
            self.kib = max(self.kib, rss_kib(self.pid) - start)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            return
        growth = [_status_kib(p, "VmHWM") - start for p, start in self._start.items()]
        self.kib = sum(max(0, g) for g in growth)

    @property
    def mib(self) -> float:
        return round(self.kib / 1024, 2)
