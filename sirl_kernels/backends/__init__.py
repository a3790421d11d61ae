"""Backend registry: which kernel implementations exist, which are usable here, and why not.

Each backend is a module implementing the contract of ``contract.Backend`` (logits forward and backward with
in-place support, fused-linear forward and backward honouring ``needs_grad``); ``get`` checks it. The backends
whose kernels read materialised logits build their fused-linear functions with the shared driver in
``chunked_linear``.

A new backend adds its module name to ``BACKEND_NAMES`` and an entry to ``_AUTO_ORDER`` if "auto" may pick it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from sirl_kernels.backends.contract import check_backend

BACKEND_NAMES = ("torch", "cpu", "triton", "cuda")
# Backend name -> module under sirl_kernels.backends ("torch" would shadow the torch package as a file name).
_MODULE_OF = {"torch": "torch_ref", "cpu": "cpu", "triton": "triton", "cuda": "cuda"}
ENV_VAR = "SIRL_KERNELS_BACKEND"

# What "auto" tries, by device type, best first. "torch" always works and ends every list.
_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why not, or what it runs on

    def __str__(self) -> str:  # pragma: no cover - presentation only
        return f"{self.name}: {'yes' if self.available else 'no'} ({self.reason})"


_MODULES: dict[str, ModuleType | Exception] = {}


def _module(name: str) -> ModuleType:
    """Imports a backend module once; import errors are remembered and re-raised as the reason."""
    if name not in _MODULES:
        try:
            _MODULES[name] = importlib.import_module(f"sirl_kernels.backends.{_MODULE_OF[name]}")
        except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unusable
            _MODULES[name] = exc
    mod = _MODULES[name]
    if isinstance(mod, Exception):
        raise RuntimeError(f"backend {name!r} failed to import: {type(mod).__name__}: {mod}") from mod
    return mod


def _reason(name: str, device: torch.device | None) -> str | None:
    try:
        mod = _module(name)
    except RuntimeError as exc:
        return str(exc)
    return mod.unavailable_reason(device)


def available_backends() -> dict[str, BackendStatus]:
    """Which backends can run on this machine, and for the others, why not.

    A backend counts as available if it can run on at least one device of this machine (CPU, or CUDA when
    present). ``SIRL_KERNELS_BACKEND`` does not change this report.
    """
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.insert(0, torch.device("cuda"))
    report = {}
    for name in BACKEND_NAMES:
        reasons = []
        ok_on = []
        for dev in devices:
            try:
                why = _reason(name, dev)
            except ValueError as exc:  # a bad setting of the backend's own (resolve raises it)
                why = str(exc)
            if why is None:
                ok_on.append(dev.type)
            else:
                reasons.append(f"{dev.type}: {why}")
        if ok_on:
            report[name] = BackendStatus(name, True, "runs on " + ", ".join(ok_on))
        else:
            report[name] = BackendStatus(name, False, "; ".join(reasons))
    return report


def resolve(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """See ``_resolve``; under torch.compile the answer is a trace-time constant, so no graph break.

    float64 inputs (gradcheck, references) run only on the "torch" backend: "auto" picks it, and naming any
    other backend raises TypeError.
    """
    if dtype == torch.float64:
        env = os.environ.get(ENV_VAR, "").strip()
        name = env if backend == "auto" and env not in ("", "auto") else backend
        if name not in ("auto", "torch"):
            raise TypeError(f"backend {name!r} supports float32, bfloat16 and float16 inputs; float64 runs on 'torch'")
        return "torch"
    return _resolve_constant(backend, str(device), os.environ.get(ENV_VAR, ""))


@torch.compiler.assume_constant_result
def _resolve_constant(backend: str, device: str, env: str) -> str:
    """``device`` as a string ("cuda:1"), index included: a backend probes the device the tensors are on."""
    return _resolve(backend, torch.device(device), env)


def _resolve(backend: str, device: torch.device, env: str) -> str:
    """Turns a requested backend name into a concrete, usable one for tensors on ``device``.

    Raises ValueError for unknown names (and a backend's bad setting, e.g. ``$SIRL_KERNELS_CPU_ISA``) and
    RuntimeError, with the reason, for a backend that cannot run.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    requested = backend
    if backend == "auto":
        env = env.strip()
        if env and env != "auto":
            requested = env
        else:
            for name in _AUTO_ORDER.get(device.type, ("torch",)):
                if _reason(name, device) is None:
                    return name
            return "torch"
    if requested not in BACKEND_NAMES:
        source = f" (from ${ENV_VAR})" if requested != backend else ""
        raise ValueError(f"unknown backend {requested!r}{source}; expected 'auto' or one of {BACKEND_NAMES}")
    why = _reason(requested, device)
    if why is not None:
        raise RuntimeError(f"backend {requested!r} is not usable for {device.type} tensors: {why}")
    return requested


def get(name: str) -> ModuleType:
    """The module implementing a resolved backend, checked against the backend contract (once)."""
    mod = _module(name)
    if name not in _CHECKED:
        check_backend(mod)
        _CHECKED.add(name)
    return mod


_CHECKED: set[str] = set()
