"""``launcher='local'``: kernels on this machine through jupyter_client's kernel managers.

``Cluster(n, kernel_name=...)`` without a launcher does the same with its own built-in code
(and is what ``ipmulti start`` uses); this class exposes it through the launcher interface
so that programs driving launchers (or plugins extending one) can treat local engines like
any other group.

Because engines are started by ``AsyncKernelManager`` from a kernelspec, any kernelspec whose
metadata names a jupyter_client *kernel provisioner* (Docker, Kubernetes, YARN... from the
gateway provisioners) starts its engines wherever that provisioner puts them, unchanged.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable
from typing import Any

from .base import Launcher, LauncherError, make_work_dir

KERNEL_ARGS = ["--HistoryManager.hist_file=:memory:"]


class LocalLauncher(Launcher):
    """``n`` kernels of kernelspec ``kernel_name`` (default ``python3``), started concurrently."""

    name = "local"

    def __init__(self, n: int | None = None, *, work_dir: str | None = None,
                 kernel_args: Iterable[str] | None = None, **kw: Any):
        super().__init__(4 if n is None else n, **kw)  # 4 engines by default, like local
        self.kernel_name = self.kernel_name or "python3"
        self.work_dir_base = work_dir
        self.work_dir: str | None = None
        self.kernel_args = list(KERNEL_ARGS if kernel_args is None else kernel_args)
        self.managers: list[Any] = []

    async def start(self) -> list[dict]:
        from jupyter_client.manager import AsyncKernelManager

        self.work_dir = make_work_dir(self.work_dir_base, prefix="ipmulti-local-")
        env = dict(os.environ)
        env.update(self.env)
        env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
        env.pop("JPY_PARENT_PID", None)
        self.managers = [
            AsyncKernelManager(kernel_name=self.kernel_name,
                               connection_file=os.path.join(self.work_dir, f"engine-{i}.json"))
            for i in range(self.n)
        ]
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(km.start_kernel(extra_arguments=self.kernel_args, env=env)
                                 for km in self.managers), return_exceptions=True),
                self.startup_timeout,
            )
        except asyncio.TimeoutError:
            await self.stop(timeout=2.0)
            raise LauncherError(f"local launcher: kernels not started within {self.startup_timeout:g} s") from None
        failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        if failed:
            await self.stop(timeout=2.0)
            raise LauncherError("local launcher: " + "; ".join(f"engine {i} failed: {r}" for i, r in failed))
        host = socket.gethostname()
        self.engines = []
        for i, km in enumerate(self.managers):
            info = km.get_connection_info(session=False)
            if isinstance(info.get("key"), bytes):
                info["key"] = info["key"].decode()
            info.update(engine_id=i, pid=getattr(km.provisioner, "pid", None), hostname=host)
            self.engines.append(info)
        return self.engines

    def liveness(self, eid: int):
        def probe() -> str | None:
            km = self.managers[eid] if eid < len(self.managers) else None
            proc = getattr(getattr(km, "provisioner", None), "process", None)
            if proc is not None and proc.poll() is not None:
                return f"exited with code {proc.poll()}"
            return None

        return probe

    async def interrupt(self, ids: Iterable[int] | None = None) -> None:
        targets = range(len(self.managers)) if ids is None else ids
        await asyncio.gather(*(self.managers[i].interrupt_kernel() for i in targets))

    async def poll(self) -> list[bool]:
        return list(await asyncio.gather(*(km.is_alive() for km in self.managers)))

    async def stop(self, timeout: float = 5.0) -> None:
        async def down(km: Any) -> None:
            try:
                km.shutdown_wait_time = timeout
                if await km.is_alive():
                    await asyncio.wait_for(km.shutdown_kernel(now=False), timeout + 2)
                else:
                    km.cleanup_resources()
            except Exception:
                try:
                    await km.shutdown_kernel(now=True)
                except Exception:
                    self._kill(km)

        await asyncio.gather(*(down(km) for km in self.managers), return_exceptions=True)
        self.managers = []
        self._remove_files()

    @staticmethod
    def _kill(km: Any) -> None:
        proc = getattr(getattr(km, "provisioner", None), "process", None)
        if proc is not None and proc.poll() is None:
            proc.kill()

    def kill_now(self) -> None:
        for km in self.managers:
            self._kill(km)
        self.managers = []
        self._remove_files()

    def to_dict(self) -> dict:
        return {"launcher": self.name, "n": self.n, "kernel_name": self.kernel_name,
                "pids": [e.get("pid") for e in self.engines], "hostname": socket.gethostname()}

    @classmethod
    def from_dict(cls, data: dict) -> LocalLauncher:
        self = cls(data["n"], kernel_name=data.get("kernel_name"))
        self._foreign_pids = data.get("pids", []) if data.get("hostname") == socket.gethostname() else []
        return self
