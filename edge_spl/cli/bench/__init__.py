"""`edge-spl bench ...`: benchmarks. Each prints a table, writes JSON and a plot, and compares
alternatives in the same run. Each benchmark's module is imported only when it runs."""
from __future__ import annotations

import importlib


def run(args) -> int:
    return importlib.import_module(f"edge_spl.cli.bench.{args.bench_command}").run(args)
