"""Threads for the test processes: the cores shared out over the pytest workers (``-n``).

Every test process (a pytest worker, a rank of a local job, a command a test starts)
would otherwise start as many torch threads as the machine has cores; with several
workers the cores are oversubscribed and OpenMP threads spin waiting for each other
(the quickstart test used 1.6 times the CPU it needs with two threads beside another
worker). ``OMP_NUM_THREADS`` set by the caller is kept; the value set here is recomputed
in each worker (xdist's controller loads this file before it starts the workers, which
inherit its environment)."""
import os
import shutil
import tempfile

if "OMP_NUM_THREADS" not in os.environ or os.environ.get("ALIGNER_TEST_THREADS") == "set":
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))
    os.environ["ALIGNER_TEST_THREADS"] = "set"

# data prepared on first use goes to a cache of the test session's own (shared by its
# workers, the ranks and the commands they start), removed when the session ends
if "ALIGNER_DATA_CACHE" not in os.environ:
    os.environ["ALIGNER_DATA_CACHE"] = tempfile.mkdtemp(prefix="aligner-test-data-cache-")
    os.environ["ALIGNER_TEST_DATA_CACHE"] = os.environ["ALIGNER_DATA_CACHE"]

import torch  # noqa: E402  after the variables: torch reads them when its thread pools start

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core and one more, which takes up the cores while a
    worker waits on the jobs it launched (the Slurm tests wait on ``sbatch``ed jobs for
    minutes, using a fraction of a core)."""
    return (os.cpu_count() or 1) + 1


def pytest_sessionfinish(session):
    """The controller (not an xdist worker) removes the data cache this session made."""
    made = os.environ.get("ALIGNER_TEST_DATA_CACHE")
    if made and made == os.environ.get("ALIGNER_DATA_CACHE") and not hasattr(session.config, "workerinput"):
        shutil.rmtree(made, ignore_errors=True)
