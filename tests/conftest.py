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

import pytest

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


# Seconds a pytest worker spent on each of the longest files in a whole run of the suite
# (`-n auto --dist loadfile` on 2 cores, with other jobs on the machine): only their order
# matters. These files are handed out first, the longest first; the others follow, those
# with the most tests first (pytest-xdist's own order). Handed out by their number of tests,
# files of few but long tests came last and ran on alone while the other workers had
# finished (the quickstart, the kill-and-resume and the Slurm files).
LONG_FILES = {
    "tests/launch/test_slurm.py": 410,
    "tests/models/test_families.py": 313,
    "tests/test_quickstart.py": 190,
    "tests/test_config.py": 111,
    "tests/models/test_hf.py": 107,
    "tests/algorithms/test_pg_resume.py": 105,
    "tests/test_cli.py": 99,
    "tests/training/test_dpo_resume.py": 95,
    "tests/parallel/test_bridge.py": 93,
    "tests/rollout/test_engine.py": 69,
    "tests/algorithms/test_ppo_resume.py": 69,
    "tests/algorithms/test_pg_parallel.py": 69,
    "tests/algorithms/test_spin_gkd_resume.py": 67,
    "tests/parallel/test_gpt_parallel.py": 66,
    "tests/training/test_layout_correctness.py": 56,
    "tests/algorithms/test_distill.py": 56,
    "tests/models/test_expert_parallel.py": 54,
    "tests/algorithms/test_ppo_parallel.py": 53,
    "tests/algorithms/test_moe_layouts.py": 49,
    "tests/training/test_run_folder.py": 49,
    "tests/training/test_blend_resume.py": 45,
    "tests/training/test_parallel_equivalence.py": 44,
    "tests/data/test_prepared.py": 42,
    "tests/algorithms/test_steerlm2_resume.py": 42,
    "tests/algorithms/test_steerlm2_online.py": 41,
    "tests/algorithms/test_spin.py": 33,
    "tests/algorithms/test_worked_examples.py": 31,
    "tests/training/test_bf16.py": 30,
    "tests/models/test_reshard_resume.py": 29,
    "tests/parallel/test_spawn.py": 29,
}


def pytest_configure(config):
    """pytest-xdist hands files out in the order :func:`pytest_collection_modifyitems` gives
    them, not re-sorted by their number of tests."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """The files of :data:`LONG_FILES` first, longest first, then the others by their number
    of tests; a file's tests keep their order (after pytest's grouping by fixture)."""
    def file_of(item):
        return item.nodeid.split("::")[0]

    count = {}
    for item in items:
        count[file_of(item)] = count.get(file_of(item), 0) + 1
    rank = {f: i for i, f in enumerate(sorted(count, key=lambda f: (-LONG_FILES.get(f, 0), -count[f])))}
    items.sort(key=lambda item: rank[file_of(item)])


def pytest_sessionfinish(session):
    """The controller (not an xdist worker) removes the data cache this session made."""
    made = os.environ.get("ALIGNER_TEST_DATA_CACHE")
    if made and made == os.environ.get("ALIGNER_DATA_CACHE") and not hasattr(session.config, "workerinput"):
        shutil.rmtree(made, ignore_errors=True)
