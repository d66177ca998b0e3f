"""Threads for the test processes: the cores shared out over the pytest workers (``-n``).

Every test process (a pytest worker, a rank of a local job, a command a test starts)
would otherwise start as many torch threads as the machine has cores; with several
workers the cores are oversubscribed and OpenMP threads spin waiting for each other
(a generation test took 20-80 s instead of 5 s on 2 cores). ``OMP_NUM_THREADS`` set by
the caller is kept."""
import os

if "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import torch  # noqa: E402  after the variables: torch reads them when its thread pools start

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
