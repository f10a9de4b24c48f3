"""The REST API under ``{base_url}ipy_multiengine/api/``, authenticated as every Jupyter
endpoint (``@web.authenticated`` and the server's authorizer, resource ``ipy_multiengine``).

``GET clusters`` (poll it: the snapshot of :class:`~.watch.Watcher`, and the launchers a start
may name), ``POST clusters``
(start a shared cluster), ``POST clusters/{id}/interrupt|restart|stop`` (``{"ids": [...]}``,
default all), ``POST clusters/{id}/engines/{eid}/console`` (a server kernel on that engine).
Nothing here blocks the server's loop: owner requests and ``ipmulti start`` run in threads
or subprocesses.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from importlib.metadata import entry_points
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

from .. import clusterfile
from ..cluster import check_launcher_option
from ..errors import MultiEngineError
from . import consoles

AUTH_RESOURCE = "ipy_multiengine"
#: the most engines a start request may ask for
MAX_ENGINES = 256
START_TIMEOUT = 120.0


class BaseHandler(APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def watcher(self) -> Any:
        return self.settings["ipy_multiengine_watcher"]

    def body(self) -> dict:
        if not self.request.body:
            return {}
        try:
            data = json.loads(self.request.body)
        except ValueError as exc:
            raise web.HTTPError(400, f"the request body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, "the request body must be a JSON object")
        return data

    def cluster(self, key: str) -> dict:
        for c in self.watcher.snapshot()["clusters"]:
            if c["id"] == key:
                return c
        raise web.HTTPError(
            404, f"no cluster {key!r} (is it still running? GET clusters lists them)"
        )

    def ids(self, cluster: dict) -> list[int]:
        known = [e["id"] for e in cluster["engines"]]
        ids = self.body().get("ids")
        if ids is None:
            return known
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise web.HTTPError(400, f"'ids' must be a list of engine ids, not {ids!r}")
        unknown = sorted(set(ids) - set(known))
        if unknown:
            raise web.HTTPError(
                400, f"cluster {cluster['id']!r} has no engine {unknown} (it has {known})"
            )
        return ids

    def need(self, cluster: dict, action: str) -> None:
        if action not in cluster["can"]:
            why = (
                "its owner does not take requests (only `ipmulti start` clusters do)"
                if not cluster["serves_requests"]
                else f"it is {cluster['state']}"
                + (" and its owner is on another host" if cluster["remote"] else "")
            )
            raise web.HTTPError(409, f"cannot {action} cluster {cluster['id']!r} from here: {why}")

    def reply(self, data: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))


class ClustersHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        snap = self.watcher.snapshot()
        self.reply({**snap, "launchers": launcher_names(), "now": _now()})

    @web.authenticated
    @authorized
    async def post(self) -> None:
        """Start a shared cluster: ``{"n", "profile", "kernel", "launcher", "options"}``."""
        body = self.body()
        argv = start_argv(body, self.kernel_spec_manager)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), START_TIMEOUT)
        except asyncio.TimeoutError:
            proc.terminate()
            raise web.HTTPError(
                504, f"`ipmulti start` took longer than {START_TIMEOUT:g} s"
            ) from None
        text = out.decode(errors="replace").strip()
        if proc.returncode != 0:
            raise web.HTTPError(400, f"ipmulti start failed: {text}")
        await asyncio.wrap_future(self.watcher.scan_now())
        key = clusterfile.cluster_file_path(body.get("profile", "default")).stem
        self.reply({"id": key, "output": text})


class ActionHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self, key: str, action: str) -> None:
        cluster = self.cluster(key)
        self.need(cluster, action)
        if action == "interrupt":
            sent = await asyncio.wrap_future(self.watcher.interrupt(key, self.ids(cluster)))
            self.reply({"interrupted": sent})
            return
        try:
            if action == "restart":
                ids = self.ids(cluster)
                answer = await asyncio.to_thread(
                    clusterfile.request_owner, cluster["file"], "restart", ids, 120.0
                )
                result = {"restarted": ids, "pids": answer.get("pids", {})}
            else:
                await asyncio.to_thread(
                    clusterfile.request_owner, cluster["file"], "stop", [], 60.0
                )
                result = {"stopped": key}
        except MultiEngineError as exc:
            raise web.HTTPError(409, str(exc)) from None
        await asyncio.wrap_future(self.watcher.scan_now())
        self.reply(result)


class ConsoleHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self, key: str, eid: str) -> None:
        cluster = self.cluster(key)
        self.need(cluster, "console")
        spec = clusterfile.read_spec(cluster["file"])
        entry = next((e for e in spec["engines"] if e["id"] == int(eid)), None)
        if entry is None:
            raise web.HTTPError(404, f"cluster {key!r} has no engine {eid}")
        kid = consoles.adopt(
            self.kernel_manager, key, int(eid), entry["connection"], entry.get("kernel_name")
        )
        self.reply({"kernel_id": kid})


def _now() -> float:
    import time

    return time.time()


@functools.cache
def launcher_names() -> list[str]:
    """The launchers a start may name (entry points ``ipy_multiengine.launchers``)."""
    return sorted({ep.name for ep in entry_points(group="ipy_multiengine.launchers")})


def start_argv(body: dict, kernel_spec_manager: Any) -> list[str]:
    """The ``ipmulti start --daemon`` command line for a start request; ``HTTPError(400)``
    naming the offending field before anything is started."""
    allowed = {"n", "profile", "kernel", "launcher", "options"}
    extra = sorted(set(body) - allowed)
    if extra:
        raise web.HTTPError(400, f"unknown field(s) {extra}; a start takes {sorted(allowed)}")
    n = body.get("n", 4)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_ENGINES:
        raise web.HTTPError(400, f"'n' must be an integer from 1 to {MAX_ENGINES}, not {n!r}")
    profile = body.get("profile", "default")
    try:
        clusterfile.check_profile(profile)
    except ValueError as exc:
        raise web.HTTPError(400, f"'profile': {exc}") from None
    if clusterfile.cluster_file_path(profile).exists():
        raise web.HTTPError(409, f"profile {profile!r} has a cluster already")
    kernel = body.get("kernel", "python3")
    specs = kernel_spec_manager.find_kernel_specs()
    if kernel not in specs:
        raise web.HTTPError(400, f"no kernelspec {kernel!r} (there are {sorted(specs)})")
    launcher = body.get("launcher", "local")
    launchers = launcher_names()
    if launcher not in launchers:
        raise web.HTTPError(400, f"no launcher {launcher!r} (there are {sorted(launchers)})")
    options = body.get("options", {})
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise web.HTTPError(
            400, f"'options' must be an object of launcher options, not {options!r}"
        )
    for k in options:
        try:
            check_launcher_option(k)
        except ValueError as exc:
            raise web.HTTPError(400, f"'options': {exc}") from None
    argv = [sys.executable, "-m", "ipy_multiengine.cli", "start", "--daemon", "-n", str(n)]
    # NAME=VALUE: a profile may begin with '-', which argparse would take for an option
    argv += [f"--profile={profile}", f"--kernel={kernel}", f"--launcher={launcher}"]
    for k, v in options.items():
        argv += ["-o", f"{k}={json.dumps(v)}"]
    return argv


def handlers() -> list[tuple[str, type]]:
    """The routes, relative to the server's base URL (the extension app prefixes it)."""
    api = "/ipy_multiengine/api"
    return [
        (f"{api}/clusters", ClustersHandler),
        (rf"{api}/clusters/([^/]+)/(interrupt|restart|stop)", ActionHandler),
        (rf"{api}/clusters/([^/]+)/engines/(\d+)/console", ConsoleHandler),
    ]
