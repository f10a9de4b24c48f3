"""``launcher='slurm'``: engines are the tasks of one Slurm batch job.

The launcher writes a batch script (template configurable) that runs
``srun python -m ipy_multiengine.engine_main`` once per task, submits it with ``sbatch``,
waits until every engine has reported its ports (engine id = ``SLURM_PROCID``), polls the job
with ``squeue`` and stops it with ``scancel``. The connection files live in ``work_dir``,
which must be on a file system shared by the submitting host and the compute nodes (the
default, under ``jupyter_runtime_dir()``, usually is: it is in the home directory).

With ``mpi='pmix'`` (or ``'pmi2'``) the tasks are started as an MPI job (``srun --mpi=...``)
and MPI is initialised in every engine, as with the mpi launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
from collections.abc import Iterable
from typing import Any

from .base import (
    EngineStartTimeout,
    Launcher,
    engine_environment,
    engine_file,
    interrupt_via_control,
    make_work_dir,
    remote_path_word,
    run_command,
    shutdown_via_control,
    wait_for_engines,
    write_engine_files,
)

DEFAULT_TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --ntasks={n}
#SBATCH --output={output}
{sbatch_lines}
{srun_command}
"""

TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
    "REVOKED",
}


class SlurmLauncher(Launcher):
    """Submit ``n`` engines as one batch job.

    Options: ``partition``, ``time`` (e.g. ``'1:00:00'``), ``account``, ``sbatch_lines``
    (extra ``#SBATCH ...`` lines, e.g. ``['#SBATCH --mem-per-cpu=2G']``), ``srun_args``,
    ``mpi`` (``None``, ``'pmix'``, ``'pmi2'``: passed as ``srun --mpi=...``), ``python`` (the
    engines' interpreter), ``setup`` (shell lines before ``srun``, e.g. ``module load ...``),
    ``ip`` (address the kernels bind; ``'*'``: all interfaces, reported by host address),
    ``template`` (the whole script as a ``str.format`` template with the fields
    ``job_name n output sbatch_lines srun_command setup work_dir``), ``job_name``,
    ``work_dir`` (shared directory for connection files), ``env``, ``sbatch``/``squeue``/
    ``scancel`` (command paths), ``kernel_args``.
    """

    name = "slurm"

    def __init__(
        self,
        n: int | None = None,
        *,
        partition: str | None = None,
        time: str | None = None,
        account: str | None = None,
        sbatch_lines: Iterable[str] = (),
        srun_args: Iterable[str] = (),
        mpi: str | None = None,
        python: str | None = None,
        setup: str = "",
        ip: str = "*",
        template: str | None = None,
        job_name: str = "ipmulti",
        work_dir: str | None = None,
        sbatch: str = "sbatch",
        squeue: str = "squeue",
        scancel: str = "scancel",
        kernel_args: Iterable[str] = (),
        **kw: Any,
    ):
        super().__init__(4 if n is None else n, **kw)  # 4 engines by default, like local
        self.partition, self.time, self.account = partition, time, account
        self.sbatch_lines = list(sbatch_lines)
        self.srun_args = list(srun_args)
        self.mpi = mpi
        self.python = python or sys.executable
        remote_path_word(self.python, "python")  # a clear error up front
        self.setup = setup
        self.ip = ip
        self.template = template or DEFAULT_TEMPLATE
        self.job_name = job_name
        self.work_dir_base = work_dir
        self.work_dir: str | None = None
        self.sbatch, self.squeue, self.scancel = sbatch, squeue, scancel
        self.kernel_args = list(kernel_args)
        self.job_id: str | None = None
        self._env: dict | None = None

    # ------------------------------------------------------------------ script
    def srun_command(self) -> str:
        args = ["srun"]
        if self.mpi:
            args.append(f"--mpi={self.mpi}")
        args += self.srun_args
        rest = [
            "-m",
            "ipy_multiengine.engine_main",
            "--connection-file",
            engine_file(self.started_dir(), "{engine_id}"),
            "--mpi",
            "yes" if self.mpi else "auto",
        ]
        if self.kernel_args:
            rest += ["--", *self.kernel_args]
        return " ".join(
            [
                *(shlex.quote(a) for a in args),
                remote_path_word(self.python),
                *(shlex.quote(a) for a in rest),
            ]
        )

    def script(self) -> str:
        lines = []
        if self.partition:
            lines.append(f"#SBATCH --partition={self.partition}")
        if self.time:
            lines.append(f"#SBATCH --time={self.time}")
        if self.account:
            lines.append(f"#SBATCH --account={self.account}")
        lines += self.sbatch_lines
        return self.template.format(
            job_name=self.job_name,
            n=self.n,
            output=os.path.join(self.started_dir(), "slurm-%j.out"),
            sbatch_lines="\n".join(lines),
            setup=self.setup,
            srun_command=(self.setup + "\n" if self.setup else "") + self.srun_command(),
            work_dir=self.work_dir,
        )

    def env_for_commands(self) -> dict:
        if self._env is None:
            self._env = engine_environment(self.env)
        return self._env

    # ------------------------------------------------------------------ lifecycle
    async def _start(self) -> list[dict]:
        self.work_dir = make_work_dir(self.work_dir_base, prefix="ipmulti-slurm-")
        paths = write_engine_files(self.work_dir, self.n, self.ip, self.transport_encryption)
        script_path = os.path.join(self.work_dir, "engines.sbatch")
        from ..engine_main import open_private

        with open_private(script_path, "w") as f:
            f.write(self.script())
        _, out, _ = await run_command(
            [self.sbatch, "--parsable", script_path], env=self.env_for_commands(), timeout=60
        )
        self.job_id = out.strip().split(";")[0]
        try:
            return await wait_for_engines(
                paths, self.startup_timeout, alive=self._problem, what=f"slurm job {self.job_id}"
            )
        except EngineStartTimeout as exc:  # the template then cancels the job
            state = await self.job_state()
            raise EngineStartTimeout(
                f"{exc}; the job was {state or 'gone'} (now cancelled)", exc.missing
            ) from None

    async def job_state(self) -> str | None:
        """``squeue``'s state of the job (e.g. ``RUNNING``, ``PENDING (Resources)``), or None."""
        if self.job_id is None:
            return None
        rc, out, _ = await run_command(
            [self.squeue, "-h", "-j", self.job_id, "-o", "%T %R"],
            env=self.env_for_commands(),
            timeout=30,
            check=False,
        )
        out = out.strip()
        if rc != 0 or not out:
            return None
        state, _, reason = out.partition(" ")
        reason = reason.strip().strip("()")
        return f"{state} ({reason})" if state == "PENDING" and reason else state

    def _output_tail(self) -> str:
        if self.work_dir is None:
            return ""
        try:
            with open(
                os.path.join(self.work_dir, f"slurm-{self.job_id}.out"), errors="replace"
            ) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    async def _problem(self) -> str | None:
        state = await self.job_state()
        if state is None or state.split()[0] in TERMINAL_STATES:
            return (
                f"the job ended ({state or 'no longer in squeue'}); its "
                f"output:\n{self._output_tail()}"
            )
        return None

    async def interrupt(self, ids: Iterable[int] | None = None) -> None:
        """All engines: ``scancel --signal=INT`` (every task of the job); some: their
        control channels."""
        ids = None if ids is None else list(ids)
        if self.job_id and (ids is None or sorted(ids) == list(range(self.n))):
            await run_command(
                [self.scancel, "--signal=INT", self.job_id], env=self.env_for_commands(), timeout=30
            )
            return
        await asyncio.gather(*(interrupt_via_control(self.engines[i]) for i in ids or ()))

    async def stop(self, timeout: float = 5.0) -> None:
        if self.job_id is not None:
            env = self.env_for_commands()
            loop = asyncio.get_running_loop()
            if self.engines:  # engines exit normally (MPI_Finalize), the job completes
                await asyncio.gather(*(shutdown_via_control(e, timeout) for e in self.engines))
                deadline = loop.time() + timeout
                while loop.time() < deadline:
                    state = await self.job_state()
                    if state is None or state.split()[0] in TERMINAL_STATES:
                        break
                    await asyncio.sleep(0.2)
            await run_command([self.scancel, self.job_id], env=env, timeout=30, check=False)
            deadline = loop.time() + timeout + 10
            while loop.time() < deadline:
                state = await self.job_state()
                if state is None or state.split()[0] in TERMINAL_STATES:
                    break
                await asyncio.sleep(0.2)
            else:
                await run_command(
                    [self.scancel, "--full", "--signal=KILL", self.job_id],
                    env=env,
                    timeout=30,
                    check=False,
                )
            self.job_id = None
        self._remove_files()

    def kill_now(self) -> None:
        import subprocess

        if self.job_id is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [self.scancel, self.job_id],
                    env=self.env_for_commands(),
                    capture_output=True,
                    timeout=30,
                )
            self.job_id = None
        self._remove_files()

    def to_dict(self) -> dict:
        return {
            "launcher": self.name,
            "n": self.n,
            "job_id": self.job_id,
            "work_dir": self.work_dir,
            "env": self.env,
            "scancel": self.scancel,
            "squeue": self.squeue,
            "engines": self.engines,
        }

    @classmethod
    def from_dict(cls, data: dict) -> SlurmLauncher:
        self = cls(
            data["n"],
            env=data.get("env"),
            scancel=data.get("scancel", "scancel"),
            squeue=data.get("squeue", "squeue"),
        )
        self.job_id, self.work_dir = data.get("job_id"), data.get("work_dir")
        self.engines = data.get("engines", [])
        return self

    def __repr__(self) -> str:
        return f"<SlurmLauncher n={self.n} job={self.job_id}>"
