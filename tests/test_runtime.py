"""The process-level helpers: the global rank before and without a process group, and the
rank-aware logging that keeps ranks other than 0 silent (errors excepted)."""
import subprocess
import sys

SCRIPT = """
from aligner.runtime import get_logger, global_rank, is_rank0
from aligner.training.logging import Progress
log = get_logger("aligner.test")
print(global_rank(), is_rank0())
log.info("an info line")
log.warning("a warning")
log.error("an error")
p = Progress("sft", 4)
p.update(2, {"loss": 0.5})
p.message("a message")
"""


def _run(env):
    import os

    return subprocess.run([sys.executable, "-W", "ignore", "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300, env={**{k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID")},
                                            **env})


def test_rank_0_logs_with_its_rank_and_other_ranks_only_errors():
    rank0 = _run({"RANK": "0", "WORLD_SIZE": "2"})
    assert rank0.stdout == "0 True\n"
    lines = rank0.stderr.splitlines()
    assert lines[:3] == ["[aligner rank 0] an info line", "[aligner rank 0] a warning", "[aligner rank 0] an error"]
    assert lines[3].startswith("[aligner rank 0] sft:  50%|") and "2/4" in lines[3] and "loss=0.5000" in lines[3]
    assert lines[4:] == ["[aligner rank 0] [sft] a message"]
    rank1 = _run({"RANK": "1", "WORLD_SIZE": "2"})
    assert rank1.stdout == "1 False\n" and rank1.stderr == "[aligner rank 1] an error\n"
    slurm = _run({"SLURM_PROCID": "3"})
    assert slurm.stdout == "3 False\n"
    single = _run({})
    assert single.stdout == "0 True\n" and "[aligner rank 0] an info line" in single.stderr
