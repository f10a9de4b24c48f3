"""Side-by-side benchmarks: ipy_multiengine against ipyparallel, dask, Pool and raw kernels.

Not part of the test suite. Run ``python -m benchmarks --help``.
"""
