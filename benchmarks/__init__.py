"""Performance measurements of transferbench (issue #8); not tests, never run by ``make test``.

Entry point: ``python -m benchmarks.run`` (see ``benchmarks/README.md``). It measures the
pipeline (Ray Train worker, cached data path, MLflow tracking) against a plain timm loop and
against the machine's measured matmul rate, and writes ``reports/bench/bench.{json,md}``.
"""
