"""Speed and memory benchmarks, run as a package from the repository root: ``python -m benchmarks.run_all``
(``make bench``) or one of them, e.g. ``python -m benchmarks.bench_quantizer --quick``."""
