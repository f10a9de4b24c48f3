"""``python -m benchmarks``: run the suite (see :mod:`benchmarks.run`)."""

if __name__ == "__main__":  # not when multiprocessing's spawn re-imports the main module
    from benchmarks.run import main

    raise SystemExit(main())
