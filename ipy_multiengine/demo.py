"""The tour that ``ipmulti demo`` runs: the tutorial's examples on freshly started local engines."""

from __future__ import annotations

import os
import time


def _show(label: str, value: object) -> None:
    print(f"\n>>> {label}")
    print(value if isinstance(value, str) else repr(value))


def tour(n: int = 4) -> int:
    """Start ``n`` engines, run the tutorial's highlights, print what happened, stop them."""
    from . import Cluster, CompositeError

    t0 = time.perf_counter()
    with Cluster(n=n, profile=f"demo-{os.getpid()}") as mec:
        print(f"started {n} engines in {time.perf_counter() - t0:.2f} s: ids {mec.get_ids()}")
        _show("mec.execute('a=5')", mec.execute("a=5"))
        mec.execute("b=10")
        evens, odds = mec.get_ids()[::2], mec.get_ids()[1::2] or mec.get_ids()[:1]
        _show(f"mec.execute('c=a+b', targets={evens})", mec.execute("c=a+b", targets=evens))
        mec.execute("c=a-b", targets=odds)
        _show("mec.execute('print(c)')", mec.execute("print(c)"))
        pr = mec.execute("import time; time.sleep(0.5)", block=False)
        _show("pr = mec.execute('time.sleep(0.5)', block=False); pr.ready()", pr.ready())
        _show("pr.r", pr.r)
        _show("mec.map(lambda x: x**10, range(8))", mec.map(lambda x: x**10, range(8)))

        @mec.parallel()
        def f(x: float) -> float:
            return 10.0 * x**4

        _show("@mec.parallel() f(range(8))", f(range(8)))
        _show("mec.push(dict(a=1.03234, b=3453))", mec.push(dict(a=1.03234, b=3453)))
        _show("mec.pull(('a', 'b'))", mec.pull(("a", "b")))
        _show("mec.zip_pull(('a', 'b'))", mec.zip_pull(("a", "b")))
        _show("mec.scatter('x', range(16))", mec.scatter("x", range(16)))
        mec.execute("y = [i**2 for i in x]")
        _show("mec.gather('y')", mec.gather("y"))
        try:
            mec.execute("1/0")
        except CompositeError as e:
            _show("mec.execute('1/0') raised CompositeError", str(e))
        t = time.perf_counter()
        mec.execute("pass")
        print(f"\nexecute('pass') on {n} engines: {1000 * (time.perf_counter() - t):.1f} ms")
    print(f"stopped; tour took {time.perf_counter() - t0:.2f} s")
    return 0
