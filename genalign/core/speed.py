"""Speed levers: the torch thread count, whether ``torch.compile`` can compile here, and the
compiled denoiser (:class:`CompiledDenoiser`, what ``backbone.compile`` puts in front of it).

Threads. torch starts with one intra-op thread per physical core of the machine, whatever share
of it this process has: on a 2-core machine two training processes of 2 threads each run several
times slower than of 1 (measured, bench/README.md). :func:`set_threads` sets the count from the
cores this process may run on (its CPU affinity, bounded by a cgroup CPU quota) divided by the
processes of this launch on this machine (``LOCAL_WORLD_SIZE``, which torchrun and
``accelerate launch`` set); an explicit ``OMP_NUM_THREADS`` (torchrun sets 1) or a requested count
wins.

Compile. Inductor compiles CPU kernels with a C++ compiler and GPU kernels with triton;
:func:`compile_unavailable` names what is missing so that a backbone falls back to eager
(``backbone.compile``) with a warning instead of failing at its first step.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def _cgroup_cores() -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 ``cpu.max``, v1 ``cfs_quota_us``), None without one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, bounded by a cgroup quota (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_cores()
    if quota is not None:
        cores = min(cores, max(1, int(quota)))
    return max(1, cores)


def local_processes() -> int:
    """Processes of this launch on this machine (torchrun / accelerate's LOCAL_WORLD_SIZE, else 1)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_threads() -> int:
    """This process's share of the cores: available cores // local processes (at least 1)."""
    return max(1, available_cores() // local_processes())


def set_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads: ``requested`` when > 0, else OMP_NUM_THREADS when set, else
    :func:`default_threads`. Returns the count in effect."""
    if requested < 0:
        raise ValueError(f"threads must be >= 0 (0: automatic), got {requested}")
    if requested:
        torch.set_num_threads(requested)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_threads())
    return torch.get_num_threads()


def set_tf32(enabled: bool = True) -> None:
    """TF32 for fp32 matrix products and convolutions on CUDA GPUs (Ampere and later: tensor cores
    with a 10-bit mantissa; what diffusers' training scripts call ``--allow_tf32``).
    Leaves CPUs alone (torch's CPU fp32 precision flag is not TF32)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def compile_unavailable(device: torch.device | str) -> str | None:
    """Why inductor cannot compile for ``device`` here, or None when it can."""
    device = torch.device(device)
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if compiler is None or (os.sep in compiler and not Path(compiler).exists()):
            return "inductor needs a C++ compiler for CPU kernels and none was found (install g++)"
        return None
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "inductor needs triton for GPU kernels and it does not import"
        return None
    return f"torch.compile is not set up for {device.type} devices in genalign"


WARMUP = 16  # calls of a kind before it is compiled: a second 10-step rollout compiles, a 16-step grid does not
RECOMPILES = 64  # graphs of one denoiser's code: kinds of call (shape, gradient, inputs' requires_grad, autocast)


def allow_recompiles(limit: int = RECOMPILES) -> None:
    """Raise dynamo's limit on graphs per code object (8 by default) to ``limit``. A denoiser's
    forward is one code object whatever the call: rollouts, training passes, the reference,
    evaluation batches and a second backbone's calls (ReNO, a bench of several methods) are each a
    graph of it, and past the limit dynamo silently runs that code eagerly from then on."""
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(dynamo, name, max(getattr(dynamo, name), limit))
    if hasattr(dynamo, "accumulated_recompile_limit"):
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * limit)


class CompiledDenoiser:
    """A denoiser called through ``torch.compile`` for the calls its mode covers (``sampling``:
    without gradient and outside the backbone's ``reference()``; ``all``: every call) and
    eagerly otherwise, so that a mode compiles only the graphs it uses. A kind of call (input
    shape, gradient, reference) runs eagerly its first ``warmup`` times (``backbone.compile_warmup``): every new kind costs a
    compile (docs/training.md, "Speed"), which pays for the rollouts and evaluation batches
    repeated all run long but not for a one-off sample grid. Attributes (``dtype``, ``config``)
    are the module's."""

    def __init__(self, module: nn.Module, mode: str, warmup: int = WARMUP):
        self.module, self.mode, self.warmup, self.in_reference = module, mode, warmup, False
        self.compiled = torch.compile(module)
        allow_recompiles()
        self.seen: dict[tuple[Any, ...], int] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        grad = torch.is_grad_enabled()
        if self.mode == "all" or not (grad or self.in_reference):
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
            kind = (None if first is None else tuple(first.shape), grad, self.in_reference)
            calls = self.seen.get(kind, 0)
            if calls >= self.warmup:
                return self.compiled(*args, **kwargs)
            self.seen[kind] = calls + 1
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # only for names the wrapper itself lacks
        if name in ("module", "compiled", "mode", "warmup", "in_reference", "seen") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.module, name)
