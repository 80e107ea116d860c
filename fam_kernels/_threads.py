"""OpenMP wait policy: why the default thread count collapsed on a busy CPU, and the fix.

torch's CPU ops and our C++ kernels (``at::parallel_for``) share torch's one OpenMP
runtime (the libgomp bundled with torch; no nested parallelism: our kernels call no
parallel aten op inside a parallel region). Every parallel region ends in a barrier.
libgomp's default wait policy makes a thread that reaches a barrier *spin* (about
300,000 iterations) before sleeping. With one of two cores held by another process,
the thread sharing that core is always runnable while it spins, so the scheduler
time-slices it against the other process in multi-millisecond slices, and every
parallel region -- thousands per diffusion step -- waits for its slice: an 8-step
2x4 ``fam generate`` took 87 s with 2 threads against 5 s with 1 (issue 12).
With ``OMP_WAIT_POLICY=PASSIVE`` a waiting thread sleeps at once, and when woken
it preempts the busy process immediately (its runtime share is small), so the
region finishes as soon as its work is done (benchmarks/results/threads.md).

libgomp reads the policy once, when it is loaded, i.e. when ``torch`` is first
imported. ``import fam_kernels`` (which imports torch) therefore sets
``OMP_WAIT_POLICY=PASSIVE`` when nobody chose a policy and the runtime is not loaded
yet; the ``fam`` CLI imports fam_kernels before torch. A process that imported
torch first keeps libgomp's default: set ``OMP_WAIT_POLICY=PASSIVE`` in the
environment (or import fam_kernels first). ``OMP_WAIT_POLICY=ACTIVE`` or
``GOMP_SPINCOUNT`` set by the user are respected. Child processes inherit it.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
DEFAULT_POLICY = "PASSIVE"
_USER_KNOBS = (WAIT_POLICY_ENV, "GOMP_SPINCOUNT", "KMP_BLOCKTIME")

# What configure_wait_policy() found: "set" (we set PASSIVE), "user" (the
# environment already chose), "too late" (an OpenMP runtime was already loaded).
status = "not configured"


def openmp_runtime_loaded() -> bool:
    """True when an OpenMP runtime is already mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            return any(("libgomp" in line or "libiomp" in line or "libomp" in line) for line in f)
    except OSError:  # not Linux: torch loads its runtime when imported
        return "torch" in sys.modules


def configure_wait_policy() -> str:
    """Set OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP, unless the user chose; return the status."""
    global status
    if any(knob in os.environ for knob in _USER_KNOBS):
        status = "user"
    elif openmp_runtime_loaded():
        status = "too late"
    else:
        os.environ[WAIT_POLICY_ENV] = DEFAULT_POLICY
        status = "set"
    return status


configure_wait_policy()
