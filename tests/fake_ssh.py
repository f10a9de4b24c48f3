#!/usr/bin/env python3
# A stand-in for ssh in tests that need no sshd (copied from the repro scripts): mocks the
# transport only; the engines are real engine_main kernels started by the remote command.
"""A stand-in for ssh: host 'bad*' is unreachable; any other host runs the command locally
(sh -c) or, with -N, forwards the -L ports with asyncio."""

import asyncio
import os
import subprocess
import sys

args = sys.argv[1:]
forwards, rest, i, N = [], [], 0, False
while i < len(args):
    a = args[i]
    if a in ("-o", "-i", "-p"):
        i += 2
        continue
    if a == "-L":
        forwards.append(args[i + 1])
        i += 2
        continue
    if a == "-N":
        N = True
        i += 1
        continue
    rest.append(a)
    i += 1
host, cmd = rest[0], rest[1:]
if host.startswith("bad"):
    sys.stderr.write(f"ssh: connect to host {host} port 22: Connection refused\n")
    sys.exit(255)
if not N:
    # what a real sshd's session gets of ours: not pytest's variables (PYTEST_CURRENT_TEST would
    # keep ipykernel from capturing the engines' fd 1 and 2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    sys.exit(subprocess.call(["sh", "-c", " ".join(cmd)], env=env))


async def pipe(r, w):
    try:
        while b := await r.read(65536):
            w.write(b)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()


async def main():
    servers = []
    for spec in forwards:
        lh, lp, rh, rp = spec.split(":")

        async def handle(r, w, rh=rh, rp=int(rp)):
            r2, w2 = await asyncio.open_connection(rh, rp)
            # the loop holds tasks weakly: keep them until the connection is done
            await asyncio.gather(pipe(r, w2), pipe(r2, w))

        servers.append(await asyncio.start_server(handle, lh, int(lp)))
    await asyncio.Event().wait()


asyncio.run(main())
