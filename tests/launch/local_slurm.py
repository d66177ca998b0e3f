"""A real one-node Slurm cluster on this machine, for the launch-script tests.

``LocalSlurm(folder).start()`` writes a munge key and a ``slurm.conf`` into ``folder`` and
starts ``munged``, ``slurmctld`` and ``slurmd -N localhost`` in the foreground of child
processes, so ``stop()`` ends exactly those three by pid (never a daemon someone else
runs). Everything listens on 127.0.0.1 only: the controller and node ports are free ports
picked at start, munge uses a socket inside ``folder``, and there is no accounting
daemon. ``submit()`` submits a batch job, waits for it to end and returns its state,
exit code and output.

``install_reason()`` installs Debian's ``slurm-wlm`` (with munge) when the programs are
missing and returns why it cannot, or None when Slurm is there.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# job states of a job that has not ended yet (scontrol's names)
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                 "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "REQUEUE_FED", "REQUEUE_HOLD", "SPECIAL_EXIT",
                 "STOPPED", "POWER_UP_NODE", "UPDATE_DB"}
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun", "scancel", "squeue")


def install_reason() -> Optional[str]:
    """None when the Slurm and munge programs are on PATH (installing them through apt-get
    as root when absent); otherwise why they are not."""
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if not missing:
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(missing)} missing) and apt-get as root is not available to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]):
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` did not finish within 600 s"
        if out.returncode != 0:
            return f"`{' '.join(cmd)}` failed (exit {out.returncode}): {out.stderr.strip()[-400:]}"
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    return f"slurm-wlm installed but {', '.join(missing)} still missing" if missing else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies without its
    finalizer (killed by a timeout), so no daemon outlives the tests."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Job:
    """A finished batch job: ``state`` as scontrol reports it (COMPLETED, FAILED, ...),
    ``exit_code`` as ``"status:signal"``, ``output`` the text of its ``--output`` file."""

    job_id: int
    state: str
    exit_code: str
    output: str


class SlurmStartError(RuntimeError):
    pass


class LocalSlurm:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.conf = self.folder / "slurm.conf"
        self.procs: List[subprocess.Popen] = []

    @property
    def env(self) -> Dict[str, str]:
        """The environment for Slurm client commands: this cluster's config."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        f = self.folder
        for sub in ("state", "spool"):
            (f / sub).mkdir(exist_ok=True)
        key = f / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        cpus = max(os.cpu_count() or 1, 2)  # two tasks per node at least, whatever nproc says
        overrides = "SlurmdParameters=config_overrides\n" if cpus > (os.cpu_count() or 1) else ""
        self.conf.write_text(f"""\
ClusterName=alignertest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={f / 'munge.sock'}
CredType=cred/munge
StateSaveLocation={f / 'state'}
SlurmdSpoolDir={f / 'spool'}
SlurmctldPidFile={f / 'slurmctld.pid'}
SlurmdPidFile={f / 'slurmd.pid'}
SlurmctldLogFile={f / 'slurmctld.log'}
SlurmdLogFile={f / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
{overrides}NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: Sequence[str]) -> None:
        log = open(self.folder / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=dict(os.environ, **self.env), start_new_session=True,
                                           preexec_fn=_die_with_parent))
        log.close()

    def _log_tail(self, name: str) -> str:
        path = self.folder / name
        return path.read_text(errors="replace")[-1200:] if path.exists() else "(no log)"

    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        """Start munged, slurmctld and slurmd; return once the node is idle. Raises
        SlurmStartError (after stopping what it started) when that does not happen."""
        self._write_config()
        f = self.folder
        try:
            self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={f / 'munge.key'}",
                                   f"--socket={f / 'munge.sock'}", f"--pid-file={f / 'munged.pid'}",
                                   f"--log-file={f / 'munged.log'}", f"--seed-file={f / 'munged.seed'}"])
            self._wait(lambda: (f / "munge.sock").exists(), timeout, "munged did not create its socket",
                       "munged.out")
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
            self._wait(self._node_idle, timeout, "the node did not become idle", "slurmctld.log")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, ready, timeout: float, what: str, log: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"{timeout:.0f} s passed"
                raise SlurmStartError(f"{what} ({why}); {log}:\n{self._log_tail(log)}")
            time.sleep(0.2)

    def _node_idle(self) -> bool:
        out = self.client(["sinfo", "--noheader", "--format=%t"], check=False)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def client(self, cmd: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        env = dict(kw.pop("env", os.environ), **self.env)
        return subprocess.run(list(cmd), env=env, capture_output=True, text=True, check=check,
                              timeout=kw.pop("timeout", 60), **kw)

    def submit(self, script, sbatch_args: Sequence[str], env: Dict[str, str], cwd: Path, script_args=(),
               umask: int = 0o022, timeout: float = 300) -> Job:
        """``sbatch`` the script from ``cwd`` with the environment ``env`` and the given umask
        (Slurm gives the job the submitter's umask); returns the job once it has ended.
        The job is polled every 0.2 s (``sbatch --wait`` polls at growing intervals of up to
        10 s, which would add seconds to every job here)."""
        submitted = subprocess.run(
            ["sbatch", "--parsable", *sbatch_args, str(script), *script_args],
            cwd=cwd, env=dict(env, **self.env), capture_output=True, text=True, timeout=60,
            preexec_fn=lambda: os.umask(umask))
        job_id = submitted.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise AssertionError(f"sbatch {' '.join(sbatch_args)} did not submit: {submitted.stderr.strip()}")
        deadline = time.monotonic() + timeout
        while True:
            fields = dict(item.split("=", 1) for item in
                          self.client(["scontrol", "--oneliner", "show", "job", job_id]).stdout.split() if "=" in item)
            if fields["JobState"] not in ACTIVE_STATES:
                break
            if time.monotonic() > deadline:
                self.client(["scancel", job_id], check=False)
                raise AssertionError(f"job {job_id} still {fields['JobState']} after {timeout:.0f} s")
            time.sleep(0.2)
        out_path = Path(fields["StdOut"])
        output = out_path.read_text(errors="replace") if out_path.exists() else ""
        return Job(int(job_id), fields["JobState"], fields["ExitCode"], output)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then end the daemons this object started, by pid
        (SIGTERM, then SIGKILL after 15 s), slurmd first."""
        if any(p.poll() is None for p in self.procs[1:]):
            self.client(["scancel", "--full", "--quiet", f"--user={os.getuid()}"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                queue = self.client(["squeue", "--noheader"], check=False)
                if queue.returncode != 0 or not queue.stdout.strip():
                    break
                time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
        self.procs = []
