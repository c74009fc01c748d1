"""`edge-spl compile`: build the device kernels ahead of time, so `edge-spl device` runs without
numba or LLVM in memory (docs/deploy.md)."""
from __future__ import annotations

import time

from edge_spl.errors import EdgeSplError


def run(args) -> int:
    from edge_spl.device import aot

    path = aot.module_path(args.dir)
    if args.check:
        there = aot.load(args.dir) is not None
        print(f"{path}: {'present, the device runs it' if there else 'missing: the device runs the kernels on numba JIT'}")
        return 0 if there else 1
    if not args.force and aot.load(args.dir) is not None:
        print(f"{path} is current: nothing to do (--force builds it again)")
        return 0
    t0 = time.perf_counter()
    try:
        path = aot.build(args.dir)
    except Exception as e:   # no compiler, no headers, no pycc: the device still runs on the JIT
        raise EdgeSplError(f"the build failed ({type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}); "
                           f"it needs a C compiler and the Python headers (apt install gcc python3-dev); "
                           f"until it is built the device runs the kernels on numba JIT") from None
    print(f"built {path} in {time.perf_counter() - t0:.1f} s; `edge-spl device` now runs without numba")
    return 0
