"""Real systems for the launcher tests, started and removed by the test suite itself.

- :class:`SSHServer`: a private ``sshd`` with throwaway host and user keys and its own config,
  listening on 127.0.0.1 or inside a network namespace.
- :class:`NetnsHost`: a second "host": a network namespace joined to this one by a veth pair
  on a private test subnet chosen among unused routes (only addresses created here).
- :class:`SlurmCluster`: munged + slurmctld + slurmd, single node, with a private
  ``slurm.conf`` under a temp dir (``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``).

Each ``start()`` raises :class:`Unavailable` with a reason when the system truly cannot run here
(not root, package missing, no namespace support); ``stop()`` ends every process it started.
``.ci/install-system-deps`` installs the packages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class Unavailable(Exception):
    """This system cannot run on this machine (the message says why)."""


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(
    host: str,
    port: int,
    timeout: float,
    proc: subprocess.Popen | None = None,
    netns: str | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process exited with {proc.returncode} before listening on {host}:{port}"
            )
        if netns:
            ok = (
                subprocess.run(
                    ["ip", "netns", "exec", netns, "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"],
                    capture_output=True,
                ).returncode
                == 0
            )
        else:
            try:
                socket.create_connection((host, port), 0.5).close()
                ok = True
            except OSError:
                ok = False
        if ok:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout} s")


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise Unavailable(
            f"{what} needs root (to run private daemons); run the suite as root as CI does"
        )


def need_command(path: str, package: str) -> str:
    found = shutil.which(path) or (path if os.access(path, os.X_OK) else None)
    if not found:
        raise Unavailable(
            f"{path} not found: install Debian package {package} (.ci/install-system-deps)"
        )
    return found


def stop_process(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------- ssh
class SSHKeys:
    """Throwaway host key, user key, authorized_keys and known_hosts in one 0700 directory."""

    def __init__(self) -> None:
        need_command("ssh-keygen", "openssh-client")
        self.dir = Path(tempfile.mkdtemp(prefix="ipmulti-ssh-"))
        os.chmod(self.dir, 0o700)
        self.host_key = self.dir / "host_ed25519_key"
        self.user_key = self.dir / "id_ed25519"
        for key in (self.host_key, self.user_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
        self.authorized_keys = self.dir / "authorized_keys"
        shutil.copy(f"{self.user_key}.pub", self.authorized_keys)
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text("")
        self.host_pub = Path(f"{self.host_key}.pub").read_text().split()[:2]

    def trust(self, address: str, port: int = 22) -> None:
        """Add the host key for ``address:port`` to our known_hosts."""
        name = address if port == 22 else f"[{address}]:{port}"
        with open(self.known_hosts, "a") as f:
            f.write(f"{name} {' '.join(self.host_pub)}\n")

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class SSHServer:
    """A private sshd on ``address:port`` (optionally inside network namespace ``netns``)."""

    def __init__(
        self,
        keys: SSHKeys,
        address: str = "127.0.0.1",
        port: int | None = None,
        netns: str | None = None,
    ) -> None:
        self.keys, self.address, self.netns = keys, address, netns
        self.port = port or (22 if netns else free_port())
        self.proc: subprocess.Popen | None = None
        self.name = f"sshd-{address}-{self.port}"

    def start(self) -> SSHServer:
        need_root("a private sshd")
        sshd = need_command("/usr/sbin/sshd", "openssh-server")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        d = self.keys.dir
        config = d / f"{self.name}.conf"
        config.write_text(
            f"Port {self.port}\n"
            f"ListenAddress {self.address}\n"
            f"HostKey {self.keys.host_key}\n"
            f"PidFile {d}/{self.name}.pid\n"
            f"AuthorizedKeysFile {self.keys.authorized_keys}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "AllowTcpForwarding yes\n"
            "X11Forwarding no\n"
            "PrintMotd no\n"
            "MaxStartups 100:30:200\n"
            "MaxSessions 100\n"
            "LogLevel ERROR\n"
        )
        cmd = [sshd, "-D", "-e", "-f", str(config)]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self.log = open(d / f"{self.name}.log", "wb")  # noqa: SIM115 open while sshd runs; stop() closes it
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_port(self.address, self.port, 15, self.proc, netns=self.netns)
        except RuntimeError as exc:
            self.stop()
            log = (d / f"{self.name}.log").read_text(errors="replace")
            raise RuntimeError(f"sshd did not start: {exc}\n{log}") from None
        self.keys.trust(self.address, self.port)
        return self

    @property
    def destination(self) -> str:
        return f"ssh://root@{self.address}:{self.port}"

    def stop(self) -> None:
        if self.proc is not None:
            # sshd and the sessions it forked (same process group)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            stop_process(self.proc)
            self.proc = None
            self.log.close()


class NetnsHost:
    """A network namespace linked by a veth pair: the host side gets .1, the namespace .2
    of a /30 in 10.213.0.0/16 that no route on this machine uses."""

    def __init__(self) -> None:
        self.name = f"ipmt{os.getpid() % 100000}"
        tag = os.getpid() % 10000
        self.veth_host, self.veth_ns = f"ipmh{tag}", f"ipmn{tag}"
        self.host_ip = self.ns_ip = ""
        self.created = False

    def _ip(self, *args: str, ns: bool = False) -> None:
        cmd = ["ip", "netns", "exec", self.name, "ip", *args] if ns else ["ip", *args]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    def _pick_subnet(self) -> tuple[str, str]:
        routes = (
            subprocess.run(
                ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True
            ).stdout
            + subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
        )
        for third in range(200, 256):
            for fourth in range(0, 256, 4):
                prefix = f"10.213.{third}."
                if prefix not in routes:
                    return f"{prefix}{fourth + 1}", f"{prefix}{fourth + 2}"
        raise RuntimeError("no unused test subnet in 10.213.200-255.0/24")

    @staticmethod
    def remove_stale() -> None:
        """Namespaces of earlier runs whose test process died without cleaning up."""
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith("ipmt") and name[4:].isdigit():
                pid = int(name[4:])
                if pid != os.getpid() % 100000 and not os.path.exists(f"/proc/{pid}"):
                    for p in subprocess.run(
                        ["ip", "netns", "pids", name], capture_output=True, text=True
                    ).stdout.split():
                        with contextlib.suppress(ProcessLookupError, ValueError):
                            os.kill(int(p), signal.SIGKILL)
                    subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def start(self) -> NetnsHost:
        need_root("a network namespace host")
        need_command("ip", "iproute2")
        self.remove_stale()
        r = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, text=True)
        if r.returncode != 0:
            raise Unavailable(f"cannot create a network namespace here: {r.stderr.strip()}")
        self.created = True
        try:
            self.host_ip, self.ns_ip = self._pick_subnet()
            self._ip("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
            self._ip("link", "set", self.veth_ns, "netns", self.name)
            self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.veth_host)
            self._ip("link", "set", self.veth_host, "up")
            self._ip("addr", "add", f"{self.ns_ip}/30", "dev", self.veth_ns, ns=True)
            self._ip("link", "set", self.veth_ns, "up", ns=True)
            self._ip("link", "set", "lo", "up", ns=True)
        except Exception:
            self.stop()
            raise
        return self

    def pids(self) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]

    def stop(self) -> None:
        if not self.created:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 3
            while pids and time.monotonic() < deadline:
                time.sleep(0.05)
                pids = self.pids()
            if not pids:
                break
        subprocess.run(["ip", "link", "del", self.veth_host], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        self.created = False


# ---------------------------------------------------------------------- slurm
class SlurmCluster:
    """munged + slurmctld + slurmd on this machine, one node, everything under a temp dir.

    Clients find it through ``env`` (``SLURM_CONF``); munge runs on a private socket named in
    ``AuthInfo`` so the system's munge (if any) is untouched.
    """

    NODE = "ipmnode"
    PARTITION = "ipmtest"

    def __init__(self, cpus: int | None = None) -> None:
        self.cpus = cpus or 8  # config_overrides: more CPUs than this 2-core box has
        self.procs: list[subprocess.Popen] = []
        self.dir: Path | None = None
        self.env: dict[str, str] = {}

    def start(self) -> SlurmCluster:
        need_root("a private Slurm cluster")
        munged = need_command("/usr/sbin/munged", "munge")
        slurmctld = need_command("/usr/sbin/slurmctld", "slurmctld")
        slurmd = need_command("/usr/sbin/slurmd", "slurmd")
        need_command("sbatch", "slurm-client")
        self.dir = d = Path(tempfile.mkdtemp(prefix="ipmulti-slurm-"))
        os.chmod(d, 0o755)
        try:
            self._start(d, munged, slurmctld, slurmd)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.dir / f"{name}.out", "wb") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._daemon_env(),
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def _daemon_env(self) -> dict:
        env = dict(os.environ)
        env.update(self.env)
        return env

    def _start(self, d: Path, munged: str, slurmctld: str, slurmd: str) -> None:
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = d / "munge.socket"
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir(mode=0o755)
        self._spawn(
            "munged",
            [
                munged,
                "-F",
                "--force",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={d}/munged.pid",
                f"--seed-file={d}/munged.seed",
                f"--log-file={d}/log/munged.log",
            ],
        )
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                raise RuntimeError(
                    f"munged did not start: {(d / 'munged.out').read_text(errors='replace')}"
                )
            time.sleep(0.05)
        host = socket.gethostname()
        ctld_port, d_port = free_port(), free_port()
        mem = 1024
        conf = d / "slurm.conf"
        conf.write_text(
            f"ClusterName=ipmtest\n"
            # job ids differ between runs: MPI names its shared memory after the job step
            f"FirstJobId={int(time.time() * 10) % 50_000_000 + 1000}\n"
            f"SlurmctldHost={host}(127.0.0.1)\n"
            f"SlurmctldPort={ctld_port}\n"
            f"SlurmdPort={d_port}\n"
            f"SlurmUser=root\nSlurmdUser=root\n"
            f"AuthType=auth/munge\nCredType=cred/munge\n"
            f"AuthInfo=socket={sock}\n"
            f"StateSaveLocation={d}/state\n"
            f"SlurmdSpoolDir={d}/spool\n"
            f"SlurmctldPidFile={d}/slurmctld.pid\n"
            f"SlurmdPidFile={d}/slurmd.pid\n"
            f"SlurmctldLogFile={d}/log/slurmctld.log\n"
            f"SlurmdLogFile={d}/log/slurmd.log\n"
            "ProctrackType=proctrack/linuxproc\n"
            "TaskPlugin=task/none\n"
            "JobAcctGatherType=jobacct_gather/none\n"
            "AccountingStorageType=accounting_storage/none\n"
            "JobCompType=jobcomp/none\n"
            "SwitchType=switch/none\n"
            "MpiDefault=none\n"
            "SchedulerType=sched/builtin\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n"
            "ReturnToService=2\n"
            "SlurmctldTimeout=30\nSlurmdTimeout=30\nInactiveLimit=0\nMinJobAge=2\nKillWait=2\n"
            "SlurmdParameters=config_overrides\n"
            f"NodeName={self.NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={mem} State=UNKNOWN\n"
            f"PartitionName={self.PARTITION} Nodes={self.NODE} Default=YES MaxTime=INFINITE "
            "State=UP OverSubscribe=YES\n"
        )
        self.conf = conf
        self.env = {"SLURM_CONF": str(conf)}
        self._spawn("slurmctld", [slurmctld, "-D", "-i", "-f", str(conf)])
        wait_port("127.0.0.1", ctld_port, 20, self.procs[-1])
        self._spawn("slurmd", [slurmd, "-D", "-N", self.NODE, "-f", str(conf)])
        deadline = time.monotonic() + 30
        state = ""
        while time.monotonic() < deadline:
            r = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"],
                capture_output=True,
                text=True,
                env=self._daemon_env(),
            )
            state = (r.stdout + r.stderr).strip()
            if r.returncode == 0 and state.startswith("idle"):
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}: {self.logs()}")
            time.sleep(0.2)
        raise RuntimeError(f"slurm node not idle after 30 s (state {state!r}): {self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted(self.dir.glob("*.out")) + sorted((self.dir / "log").glob("*.log")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}")
        return "\n".join(out)

    def stop(self) -> None:
        if self.env:
            subprocess.run(
                ["scancel", "--full", "-u", "root", "-p", self.PARTITION],
                capture_output=True,
                env=self._daemon_env(),
                timeout=30,
            )
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
