"""A real single-node SLURM cluster (munged + slurmctld + slurmd) under a temporary directory.

Used by tests/test_slurm.py to submit the real `launch/*.sbatch` scripts. Needs root and
Debian's packages `slurmctld slurmd slurm-client munge` (SLURM 22.05 on Debian 12): `.ci/run`
installs them. No cgroups: processes are tracked by /proc (proctrack/linuxproc) and tasks are
not confined (task/none), which is what a container allows.

The node advertises two count-only GPUs (`Gres=gpu:2`, no device files) so the scripts'
`--gpus-per-node` requests schedule exactly as on a GPU cluster; torch sees no CUDA device
and the job trains on the CPU with gloo.

Every daemon is started here, recorded by PID, and stopped by PID in `stop()`; nothing is
left running and no system path (/etc/slurm, /run/munge) is touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REQUIRED = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "squeue")


def missing_binaries() -> list[str]:
    return [b for b in REQUIRED if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """`with SlurmCluster(tmp) as c: c.sbatch([...])`. Clients need `c.env` (SLURM_CONF)."""

    def __init__(self, root: Path, cpus: int = 2, gpus: int = 2):
        self.root = Path(root)
        self.cpus, self.gpus = cpus, gpus
        self.pids: dict[str, int] = {}
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # --- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> None:
        r = self.root
        for d in ("munge/run", "munge/lib", "munge/etc", "state", "spool", "log", "pid"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge/run", 0o755)  # munged refuses a socket directory others can write
        key = r / "munge/etc/munge.key"
        subprocess.run([_which("mungekey"), "--create", "--force", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(key, 0o400)
        sock = r / "munge/run/munge.socket"
        # munged daemonizes: the PID is in its pid file once it is up.
        subprocess.run(
            [_which("munged"), "--force", f"--socket={sock}", f"--key-file={key}",
             f"--pid-file={r / 'pid/munged.pid'}", f"--log-file={r / 'log/munged.log'}",
             f"--seed-file={r / 'munge/lib/munged.seed'}"],
            check=True, capture_output=True,
        )
        self.pids["munged"] = int((r / "pid/munged.pid").read_text().split()[0])

        self.conf.write_text(self._slurm_conf(sock))
        # SLURM drops a GPU without a device file; empty files stand in for /dev/nvidiaN.
        (r / "dev").mkdir(exist_ok=True)
        for i in range(self.gpus):
            (r / f"dev/gpu{i}").touch()
        files = f"{r / 'dev/gpu'}[0-{self.gpus - 1}]" if self.gpus > 1 else str(r / "dev/gpu0")
        (r / "gres.conf").write_text(f"NodeName=localhost Name=gpu File={files}\n")
        for name, cmd in (
            ("slurmctld", [_which("slurmctld"), "-f", str(self.conf)]),
            ("slurmd", [_which("slurmd"), "-f", str(self.conf), "-N", "localhost"]),
        ):
            subprocess.run(cmd, check=True, capture_output=True, env=self.env)  # daemonizes
            self.pids[name] = self._wait_pid(r / f"pid/{name}.pid", name)
        self._wait_idle(timeout_s)

    def stop(self) -> None:
        """SIGTERM each daemon this cluster started (by PID), then SIGKILL what is left."""
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.get(name)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                self.pids.pop(name)
        deadline = time.monotonic() + 10
        while self.pids and time.monotonic() < deadline:
            for name, pid in list(self.pids.items()):
                if not _alive(pid):
                    self.pids.pop(name)
            time.sleep(0.1)
        for pid in self.pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pids.clear()

    # --- clients --------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**self.env, **kw.pop("env", {})}, check=check, capture_output=True,
                              text=True, timeout=timeout, **kw)

    def logs(self) -> str:
        """The daemons' logs, for a failing test's message."""
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {f.name} ---\n" + "\n".join(f.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(out)

    # --- internals ------------------------------------------------------------------------
    def _slurm_conf(self, munge_socket: Path) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=distribgpt-test",
            "SlurmctldHost=localhost",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again
            # (default 120 s); a short one keeps the requeue test quick.
            f"AuthInfo=socket={munge_socket},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'pid/slurmctld.pid'}",
            f"SlurmdPidFile={r / 'pid/slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}",
            f"SlurmdLogFile={r / 'log/slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "GresTypes=gpu",
            "MinJobAge=600",  # keep finished jobs visible to scontrol for a while
            f"NodeName=localhost CPUs={self.cpus} Gres=gpu:{self.gpus} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
            "",
        ])

    def _wait_pid(self, pid_file: Path, name: str, timeout_s: float = 20) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                return int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                time.sleep(0.1)
        raise RuntimeError(f"{name} wrote no pid file {pid_file}\n{self.logs()}")

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            p = self.run("sinfo", "-h", "-o", "%T", check=False)
            state = p.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM node not idle after {timeout_s}s (sinfo: {state!r})\n{self.logs()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
