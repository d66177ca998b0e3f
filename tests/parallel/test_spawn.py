"""spawn_local: per-rank results in order; a rank that raises, dies or hangs fails the
call within its timeout, and no rank process (nor anything a rank started) is left behind."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aligner.parallel.spawn import SpawnError, spawn_local

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process checks read /proc")


def _descendants(root: int) -> dict:
    """{pid: cmdline} of every live (non-zombie) process below ``root``."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            children.setdefault(int(ppid), []).append((int(entry.name), cmdline))
    found, todo = {}, [root]
    while todo:
        for pid, cmdline in children.get(todo.pop(), []):
            found[pid] = cmdline
            todo.append(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _assert_no_rank_left():
    ranks = {pid: cmd for pid, cmd in _descendants(os.getpid()).items() if "spawn_main" in cmd}
    assert not ranks, f"rank processes still alive: {ranks}"


# --- rank functions (module level: they travel to the ranks by pickle) ---

def rank_record(base, scale=1):
    import torch

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return {"rank": rank, "world": world, "local_rank": int(os.environ["LOCAL_RANK"]),
            "value": base + scale * rank, "tensor": torch.full((2,), float(rank))}


def raise_on_rank1():
    if os.environ["RANK"] == "1":
        raise ValueError("rank one is broken")
    return "ok"


def die_on_rank0():
    if os.environ["RANK"] == "0":
        os._exit(3)
    time.sleep(600)


def hang(marker_dir):
    """Rank 0 waits in an all-reduce that rank 1 never joins; rank 1 starts a child and sleeps."""
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=rank,
                            world_size=2)
    if rank == 0:
        Path(marker_dir, "rank0").write_text("in all_reduce")
        dist.all_reduce(torch.ones(1))
    else:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(marker_dir, "rank1").write_text(str(child.pid))
        time.sleep(600)


# --- tests ---

def test_results_in_rank_order():
    out = spawn_local(rank_record, 3, 10, scale=5, timeout=120)
    assert [(r["rank"], r["world"], r["local_rank"], r["value"]) for r in out] == [
        (0, 3, 0, 10), (1, 3, 1, 15), (2, 3, 2, 20)]
    assert [r["tensor"].tolist() for r in out] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    _assert_no_rank_left()


def test_a_rank_that_raises_is_named_with_its_traceback():
    with pytest.raises(SpawnError) as err:
        spawn_local(raise_on_rank1, 2, timeout=120)
    message = str(err.value)
    assert message.startswith("rank 1 of 2 failed: ValueError: rank one is broken")
    assert "Traceback (most recent call last)" in message and "in raise_on_rank1" in message
    _assert_no_rank_left()


def test_a_rank_that_dies_fails_within_the_timeout():
    timeout = 120
    start = time.monotonic()
    with pytest.raises(SpawnError, match="^rank 0 of 2 died with exit code 3$"):
        spawn_local(die_on_rank0, 2, timeout=timeout)
    # reported when it dies, not at the timeout; rank 1 (asleep for 600 s) is killed
    assert time.monotonic() - start < timeout / 2
    _assert_no_rank_left()


def test_a_hanging_rank_fails_at_the_timeout_and_everything_is_killed(tmp_path):
    timeout = 20
    start = time.monotonic()
    with pytest.raises(SpawnError, match=r"^ranks \[0, 1\] of 2 did not finish within 20 s$"):
        spawn_local(hang, 2, str(tmp_path), timeout=timeout)
    elapsed = time.monotonic() - start
    assert timeout <= elapsed < timeout + 10
    # both ranks had reached their hang (not still starting up) when the timeout struck
    assert (tmp_path / "rank0").read_text() == "in all_reduce"
    grandchild = int((tmp_path / "rank1").read_text())
    _assert_no_rank_left()
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "a process started by a rank outlived the job"


# --- python command lines from the fork server ---

SCRIPT = """\
import atexit, os, sys, warnings
atexit.register(lambda: print("atexit ran", flush=True))
warnings.warn("a warning")
print(sys.argv, os.getcwd() == os.environ["EXPECT_CWD"], os.environ.get("ALIGNER_TEST_VALUE"), __name__)
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def test_python_commands_run_as_under_a_fresh_interpreter(tmp_path):
    """``run_python``: a script, ``-m`` and ``-c``, each with its arguments, folder,
    environment, ``__main__``, exit status, atexit handlers and ``-W`` option; the same
    output as ``python`` itself gives."""
    from aligner.parallel.spawn import run_python

    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    (tmp_path / "scriptmod.py").write_text(SCRIPT)
    env = dict(os.environ, ALIGNER_TEST_VALUE="v1", EXPECT_CWD=str(tmp_path))
    for argv, argv0 in (([str(script), "3", "x"], str(script)),
                        (["-m", "scriptmod", "3", "x"], str(tmp_path / "scriptmod.py")),
                        (["-c", SCRIPT, "3", "x"], "-c")):
        out = run_python(["-W", "ignore", *argv], cwd=tmp_path, env=env, timeout=60)
        fresh = subprocess.run([sys.executable, "-W", "ignore", *argv], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=60)
        assert out.returncode == fresh.returncode == 3
        assert out.stdout == fresh.stdout == f"[{argv0!r}, '3', 'x'] True v1 __main__\natexit ran\n"
        assert out.stderr == fresh.stderr == "to stderr\n"
    warned = run_python([str(script), "0"], cwd=tmp_path, env=env, timeout=60)
    assert warned.returncode == 0 and "UserWarning: a warning" in warned.stderr
    failed = run_python(["-c", "raise KeyError('k')"], timeout=60)
    assert failed.returncode == 1 and failed.stderr.rstrip().endswith("KeyError: 'k'")
    with pytest.raises(ValueError, match="expected"):
        run_python(["-x", "y"])


def test_a_killed_python_command_takes_its_process_group_along(tmp_path):
    """``start_python(...).kill()`` ends the command and whatever it started; ``wait``
    reports the signal as ``Popen`` does."""
    from aligner.parallel.spawn import start_python

    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
            f"open({str(tmp_path / 'child')!r}, 'w').write(str(child.pid))\n"
            "time.sleep(300)\n")
    proc = start_python(["-c", code], stdout=tmp_path / "out", stderr=tmp_path / "err")
    deadline = time.monotonic() + 60
    while not (tmp_path / "child").exists() or not (tmp_path / "child").read_text():
        assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "err").read_text()
        time.sleep(0.05)
    child = int((tmp_path / "child").read_text())
    assert proc.poll() is None and _alive(child)
    proc.kill()
    assert proc.wait(timeout=30) == -9
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_free_port_lies_below_the_ephemeral_range_and_binds():
    """Rendezvous ports are drawn where the kernel hands out no outgoing connection's port
    (so a neighbouring job's gloo pairs cannot take one before the server binds it)."""
    import socket

    from aligner.parallel.state import free_port

    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(10000 <= p < low for p in ports), sorted(ports)
    assert len(ports) > 1  # drawn, not one fixed port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports.pop()))
