"""``launcher='ssh'``: engines on other machines, started and reached through the system ssh.

    Cluster(launcher="ssh", hosts={"node1": 2, "user@node2": 2})

For each engine the launcher

1. runs ``ssh HOST 'SETUP; PYTHON -m ipy_multiengine.engine_main --stdin --detach ...'`` and
   writes the engine's connection info (with its fresh key) to that ssh's *standard input*,
   never on a command line; the remote side saves it in a private file, starts the kernel in a
   new session (so it outlives the ssh connection) bound to the remote *loopback*, waits until
   the kernel has bound its ports and prints them as one line;
2. forwards the five ports with one ``ssh -N -o ExitOnForwardFailure=yes -L ...`` process, so
   the controller talks to ``127.0.0.1:LOCAL_PORT`` and nothing of the kernel is exposed on
   the remote network.

Host keys are always checked (``StrictHostKeyChecking=yes``, ``BatchMode=yes``): the hosts must
be in ``known_hosts`` (the user's, or the file given as ``known_hosts=``). Interrupts
(``SIGINT``) and stops (``SIGTERM``, then ``SIGKILL``) are sent over ssh by the same helper
module, which checks that the pid really runs that engine's connection file.

Per host, the remote Python and an environment set-up command can be configured::

    hosts={"node1": 2,
           "node2": {"n": 4, "python": "/opt/env/bin/python",
                     "setup": "source /opt/env/bin/activate", "ssh_args": ["-p", "2222"]}}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
from collections.abc import Iterable
from typing import Any

from ..engine_main import READY_PREFIX
from ..errors import ConfigError
from .base import (
    Launcher,
    LauncherError,
    add_curve_keys,
    connection_info,
    encryption_policy,
    new_connection_info,
    remote_path_word,
    run_command,
)

FORWARD_ATTEMPTS = 3


class _NotStarted(Exception):
    """An engine not started because another engine of the group had failed first."""


def _free_ports(k: int) -> list[int]:
    """``k`` free loopback ports from jupyter_client's port cache (never handed out twice)."""
    from jupyter_client.provisioning.local_provisioner import LocalPortCache

    cache = LocalPortCache.instance()
    return [cache.find_available_port("127.0.0.1") for _ in range(k)]


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class SSHLauncher(Launcher):
    """Engines on the hosts of ``hosts`` (host -> count, or host -> options dict).

    Options: ``python`` (remote interpreter, default ``python3``; a leading ``~`` or ``$HOME``
    is the remote home), ``setup`` (shell code run
    before it, e.g. ``source env/bin/activate``), ``env`` (variables for the engines),
    ``ssh`` (the ssh executable), ``ssh_args`` (extra options for every ssh), ``known_hosts``
    (a known_hosts file to use instead of the user's), ``identity_file``, ``kernel_args``,
    ``max_connections_per_host`` (ssh connections opened at once per host, default 8: sshd
    drops unauthenticated connections beyond its ``MaxStartups``, 10 by default).
    """

    name = "ssh"
    PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")

    def __init__(
        self,
        n: int | None = None,
        *,
        hosts: dict[str, Any] | Iterable[str] | None = None,
        python: str = "python3",
        setup: str = "",
        ssh: str = "ssh",
        ssh_args: Iterable[str] = (),
        known_hosts: str | None = None,
        identity_file: str | None = None,
        kernel_args: Iterable[str] = (),
        max_connections_per_host: int = 8,
        **kw: Any,
    ):
        if not hosts:
            raise ConfigError("the ssh launcher needs hosts={'host': n_engines, ...}", "hosts")
        if not isinstance(hosts, dict):
            hosts = {h: 1 for h in hosts}
        self.hosts: dict[str, dict] = {}
        for host, spec in hosts.items():
            spec = {"n": spec} if isinstance(spec, int) else dict(spec)
            unknown = set(spec) - {"n", "python", "setup", "ssh_args", "env"}
            if unknown:
                raise ConfigError(
                    f"ssh launcher: unknown option(s) {sorted(unknown)} for host {host!r}", "hosts"
                )
            if not isinstance(spec.get("n", 1), int) or spec.get("n", 1) < 1:
                raise ConfigError(
                    f"ssh launcher: host {host!r} needs a positive engine count", "hosts"
                )
            spec.setdefault("n", 1)
            remote_path_word(spec.get("python", python), "python")  # a clear error up front
            self.hosts[host] = spec
        total = sum(s["n"] for s in self.hosts.values())
        if n is not None and n != total:
            raise ConfigError(f"ssh launcher: n={n} but hosts add up to {total} engines", "n")
        super().__init__(total, **kw)
        self.python = python
        self.setup = setup
        self.ssh = ssh
        self.ssh_args = list(ssh_args)
        self.known_hosts = known_hosts
        self.identity_file = identity_file
        self.kernel_args = list(kernel_args)
        # sshd drops unauthenticated connections beyond MaxStartups (default 10): open at most
        # this many at once per host
        self.max_connections_per_host = max_connections_per_host
        self._gates: dict[str, asyncio.Semaphore] = {}
        # per engine: host, remote report (pid, connection_file, remote ports), forwarder
        self.placement: list[str] = [h for h, s in self.hosts.items() for _ in range(s["n"])]
        self.remote: list[dict | None] = [None] * total
        self.forwarders: list[asyncio.subprocess.Process | None] = [None] * total

    # ------------------------------------------------------------------ commands
    def ssh_command(self, host: str, *extra: str) -> list[str]:
        cmd = [self.ssh, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
        if self.known_hosts:
            cmd += [
                "-o",
                f"UserKnownHostsFile={self.known_hosts}",
                "-o",
                "GlobalKnownHostsFile=/dev/null",
            ]
        if self.identity_file:
            cmd += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        cmd += self.ssh_args + list(self.hosts.get(host, {}).get("ssh_args", ())) + list(extra)
        return [*cmd, host]

    def remote_command(self, host: str, *args: str) -> str:
        """The shell command line run on ``host``: set-up, environment, engine_main ARGS."""
        spec = self.hosts.get(host, {})
        python = spec.get("python", self.python)
        setup = spec.get("setup", self.setup)
        env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", **self.env, **spec.get("env", {})}
        line = " ".join(
            [
                "exec",
                "env",
                *(shlex.quote(f"{k}={v}") for k, v in env.items()),
                remote_path_word(python),
                "-m",
                "ipy_multiengine.engine_main",
                *map(shlex.quote, args),
            ]
        )
        return f"{setup}; {line}" if setup.strip() else line

    # ------------------------------------------------------------------ starting
    async def _start(self) -> list[dict]:
        """Start every engine; after the first failure no further engine starts, the ones under
        way finish (so each is known and stopped by identity, never left detached), then the
        template's ``stop`` takes down everything that did start."""
        failed = asyncio.Event()

        async def one(eid: int) -> dict:
            try:
                return await self._start_engine(eid, failed)
            except BaseException:
                failed.set()
                raise

        results = await asyncio.gather(*(one(i) for i in range(self.n)), return_exceptions=True)
        errors = [
            r for r in results if isinstance(r, BaseException) and not isinstance(r, _NotStarted)
        ]
        if errors:
            for r in errors:
                if not isinstance(r, Exception):
                    raise r  # Ctrl-C, cancellation
            raise errors[0]
        return [r for r in results if not isinstance(r, BaseException)]  # errors raised above

    def _gate(self, host: str) -> asyncio.Semaphore:
        if host not in self._gates:
            self._gates[host] = asyncio.Semaphore(self.max_connections_per_host)
        return self._gates[host]

    async def _start_engine(self, eid: int, failed: asyncio.Event) -> dict:
        async with self._gate(self.placement[eid]):
            if failed.is_set():
                raise _NotStarted(eid)
            return await self._start_engine_now(eid)

    async def _start_engine_now(self, eid: int) -> dict:
        host = self.placement[eid]
        # the kernel listens on the remote loopback (reached through ssh): encrypted when asked
        info = add_curve_keys(
            new_connection_info("127.0.0.1", self.kernel_name or ""),
            encryption_policy(self.transport_encryption, "127.0.0.1"),
        )
        timeout = self.startup_timeout or 3600.0
        args = [
            "--stdin",
            "--detach",
            "--engine-id",
            str(eid),
            "--mpi",
            "no",
            "--timeout",
            str(timeout),
        ]
        if self.kernel_args:
            args += ["--", *self.kernel_args]
        cmd = [*self.ssh_command(host), self.remote_command(host, *args)]
        try:
            rc, out, err = await run_command(
                cmd, input=json.dumps(info).encode(), timeout=timeout + 15, check=False
            )
        except asyncio.TimeoutError:
            raise LauncherError(
                f"ssh launcher: engine {eid} on {host} never reported within {timeout:g} s"
            ) from None
        report = None
        for line in out.splitlines():
            if line.startswith(READY_PREFIX):
                report = json.loads(line[len(READY_PREFIX) :])
        if rc != 0 or report is None:
            raise LauncherError(
                f"ssh launcher: engine {eid} on {host} failed to start (ssh exit code {rc}): "
                f"{(err or out).strip()[-2000:]}"
            )
        self.remote[eid] = {k: v for k, v in report.items() if k != "curve_secretkey"}
        local = {
            k: v
            for k, v in connection_info(report).items()
            if k not in ("connection_file", "log_file")
        }
        local.update(await self._forward(eid, host, report))
        local["ip"] = "127.0.0.1"
        local["ssh_host"] = host
        return local

    async def _forward(self, eid: int, host: str, report: dict) -> dict:
        """One ``ssh -N -L`` per engine for its five ports; returns the local ports."""
        last_error = ""
        for _ in range(FORWARD_ATTEMPTS):
            local = dict(zip(self.PORTS, _free_ports(len(self.PORTS)), strict=True))
            forwards: list[str] = []
            for name in self.PORTS:
                forwards += ["-L", f"127.0.0.1:{local[name]}:127.0.0.1:{report[name]}"]
            cmd = self.ssh_command(
                host,
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "ServerAliveInterval=15",
                *forwards,
            )
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            self.forwarders[eid] = proc
            loop = asyncio.get_running_loop()
            deadline = loop.time() + (self.startup_timeout or 60.0)
            while proc.returncode is None and loop.time() < deadline:
                if all(await asyncio.gather(*(_port_open(p) for p in local.values()))):
                    return local
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.05)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
                raise LauncherError(
                    f"ssh launcher: port forward to engine {eid} on {host} timed out"
                )
            assert proc.stderr is not None  # stderr=PIPE
            last_error = (await proc.stderr.read()).decode(errors="replace").strip()
            self.forwarders[eid] = None
        raise LauncherError(
            f"ssh launcher: cannot forward the ports of engine {eid} on {host}: {last_error}"
        )

    # ------------------------------------------------------------------ control
    def liveness(self, eid: int) -> None:
        """None: this client cannot poll a remote kernel (the port forwarder stays up when the
        kernel dies), so the controller watches every ssh engine by heartbeats, which go
        through the forwarder and so also notice when it exits."""
        return None

    async def _remote_helper(
        self, eids: Iterable[int], *args: str, timeout: float = 30.0
    ) -> dict[str, tuple[int, str]]:
        """Run ``engine_main ARGS --stdin`` once per host for its engines among ``eids``, the
        [pid, connection file] pairs on stdin; returns host -> (exit code, message)."""
        by_host: dict[str, list] = {}
        for eid in eids:
            report = self.remote[eid] if eid < len(self.remote) else None
            if report:
                by_host.setdefault(self.placement[eid], []).append(
                    [report["pid"], report["connection_file"]]
                )

        async def one(host: str, pairs: list) -> tuple[int, str]:
            cmd = [*self.ssh_command(host), self.remote_command(host, *args, "--stdin")]
            try:
                async with self._gate(host):
                    rc, out, err = await run_command(
                        cmd, input=json.dumps(pairs).encode(), timeout=timeout, check=False
                    )
            except asyncio.TimeoutError:
                return -1, f"ssh to {host} timed out"
            return rc, (err or out).strip()

        hosts = list(by_host)
        results = await asyncio.gather(*(one(h, by_host[h]) for h in hosts))
        return dict(zip(hosts, results, strict=True))

    async def interrupt(self, ids: Iterable[int] | None = None) -> None:
        """SIGINT to each engine, sent over ssh (one connection per host)."""
        targets = range(self.n) if ids is None else list(ids)
        results = await self._remote_helper(targets, "--signal", "INT")
        failed = [f"{host}: {msg}" for host, (rc, msg) in results.items() if rc not in (0, 3)]
        if failed:
            raise LauncherError("ssh launcher: interrupt failed: " + "; ".join(failed))

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop every engine over ssh (one connection per host) and end the forwarders; raises
        :class:`LauncherError` naming the hosts and engines that may still run when a remote
        stop failed (they stay recorded, so a second ``stop`` tries again)."""
        results = await self._remote_helper(
            range(self.n), "--stop", "--timeout", str(timeout), timeout=timeout + 30
        )
        failed_hosts = {host: msg for host, (rc, msg) in results.items() if rc != 0}
        left = [
            eid
            for eid, report in enumerate(self.remote)
            if report and self.placement[eid] in failed_hosts
        ]
        self.remote = [r if i in left else None for i, r in enumerate(self.remote)]
        for i, proc in enumerate(self.forwarders):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()
            self.forwarders[i] = None
        if left:
            raise LauncherError(
                "ssh launcher: could not stop engine(s) "
                + ", ".join(map(str, left))
                + ": "
                + "; ".join(f"{host}: {msg or 'no answer'}" for host, msg in failed_hosts.items())
                + " (they may still be running there)",
                method="stop",
            )

    def kill_now(self) -> None:
        by_host: dict[str, list] = {}
        for eid, report in enumerate(self.remote):
            if report:
                by_host.setdefault(self.placement[eid], []).append(
                    [report["pid"], report["connection_file"]]
                )
        for host, pairs in by_host.items():
            cmd = [
                *self.ssh_command(host),
                self.remote_command(host, "--stop", "--timeout", "1", "--stdin"),
            ]
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    cmd, input=json.dumps(pairs).encode(), capture_output=True, timeout=20
                )
        self.remote = [None for _ in range(self.n)]
        for proc in self.forwarders:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)

    def to_dict(self) -> dict:
        return {
            "launcher": self.name,
            "hosts": self.hosts,
            "python": self.python,
            "setup": self.setup,
            "env": self.env,
            "ssh": self.ssh,
            "ssh_args": self.ssh_args,
            "known_hosts": self.known_hosts,
            "identity_file": self.identity_file,
            "remote": self.remote,
        }

    @classmethod
    def from_dict(cls, data: dict) -> SSHLauncher:
        self = cls(
            hosts=data["hosts"],
            python=data.get("python", "python3"),
            setup=data.get("setup", ""),
            env=data.get("env"),
            ssh=data.get("ssh", "ssh"),
            ssh_args=data.get("ssh_args", ()),
            known_hosts=data.get("known_hosts"),
            identity_file=data.get("identity_file"),
        )
        self.remote = list(data.get("remote") or [None] * self.n)
        return self

    def __repr__(self) -> str:
        return f"<SSHLauncher hosts={ {h: s['n'] for h, s in self.hosts.items()} }>"
