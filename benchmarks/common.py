"""Shared benchmark plumbing: timing, CPU peak-memory measurement, read bandwidth, table and JSON output."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


# --- timing ------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- memory ------------------------------------------------------------------------------------------------------
def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_extra_bytes(fn) -> int | None:
    """Peak resident memory that ``fn`` adds on top of what is resident when it starts (Linux only).

    Resets the process's high-water mark (writing 5 to /proc/self/clear_refs), runs fn, and reads VmHWM.
    Tensors fn returns are counted (callers subtract outputs they expect).
    """
    try:
        gc.collect()
        _honest_malloc(True)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = status_kib("VmRSS")
        result = fn()
        peak = status_kib("VmHWM")
        del result
        return max(0, (peak - start) * 1024)
    except (OSError, RuntimeError):
        return None
    finally:
        _honest_malloc(False)


_M_MMAP_THRESHOLD = -3


def _honest_malloc(on: bool) -> None:
    """While measuring, glibc serves every block above 64 KiB by mmap and returns it on free.

    Otherwise glibc keeps freed blocks (its mmap threshold grows up to 32 MiB), a later allocation reuses
    resident memory, and the resident-set peak under-counts what an implementation allocates. Timing runs
    use glibc's usual 32 MiB steady state.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024 if on else 32 * 1024 * 1024)
    libc.malloc_trim(0)


def measure_read_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of a full read (a sum) over a buffer much larger than the caches."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    t = median_seconds(lambda: x.sum(), repeats, device, warmup=2)
    return x.numel() * 4 / t


# --- output ------------------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_results(out_dir: str | Path, name: str, meta: dict, rows: list[dict], columns: list[tuple[str, str]]):
    """Writes OUT_DIR/NAME.json and OUT_DIR/NAME.md; returns the markdown table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    header = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, sep]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif isinstance(value, float):
                cells.append(f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / f"{name}.md").write_text(
        f"Machine: {meta.get('cpu')} ({meta.get('threads')} threads), torch {meta.get('torch')}, "
        f"{meta.get('date')}\n\n{table}\n"
    )
    return table
