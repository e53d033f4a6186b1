"""How many CPU threads fedmeta's work uses, set on purpose in every process.

torch, OpenMP and BLAS each default to one thread per core. On a shared
machine, every Ray worker and baseline loop doing that oversubscribes the
cores: measured on this project's 2-core machine with other jobs running,
``fedmeta demo`` took 1,961 s with the defaults and 109 s with one thread per
process (see ``benchmarks/busy_machine.py``).

- The command (``fedmeta --threads N``, or ``$FEDMETA_THREADS``) uses N
  threads, 1 by default; :func:`limit_threads` also exports the limit to child
  processes (Ray workers, Flower's ClientApp processes), which read it when
  they import torch.
- A site worker uses the cores it is given: ``simulation.cpus_per_site``
  rounded down (at least 1) in simulation, ``$FEDMETA_THREADS`` (default 1)
  on the Deployment Engine (:func:`site_threads`).
"""

from __future__ import annotations

import math
import os

THREADS_ENV = "FEDMETA_THREADS"
_LIBRARY_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def configured_threads() -> int:
    """``$FEDMETA_THREADS`` if set (a positive integer), else 1."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"${THREADS_ENV} must be a positive whole number of threads, got {raw!r}")
    return int(raw)


def limit_threads(threads: int | None = None) -> int:
    """Use ``threads`` (default :func:`configured_threads`) in this process and in the processes it starts.

    >>> limit_threads(1)
    1
    """
    import torch

    n = configured_threads() if threads is None else threads
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    os.environ[THREADS_ENV] = str(n)
    for name in _LIBRARY_ENV:
        os.environ[name] = str(n)
    return n


def site_threads(cpus_per_site: float | None) -> int:
    """Threads for one site's work: the simulation's ``cpus_per_site`` (at least 1), else the configured count."""
    if cpus_per_site is not None:
        return max(1, math.floor(cpus_per_site))
    return configured_threads()
