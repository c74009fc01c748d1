"""The device's kernels compiled ahead of time (numba.pycc) into a small extension module, so the
device process runs them without importing numba or LLVM at all.

Why: numba's JIT keeps LLVM resident even when every kernel comes from its cache (it links the
cached object code and compiles its runtime at start-up): about 110 MB of the device's peak RSS
(docs/bench-speed.md). The AOT module holds the same machine code as the JIT would make from the
same source (`kernel_code`), and needs only numpy at run time.

    edge-spl compile [--dir DIR]     # build once per machine (needs numba, a C compiler,
                                     # Python headers and setuptools); also python -m edge_spl.device.aot

The module's name carries a hash of what it was built from: the kernel source and this file,
the Python version, numpy's version and the machine type. `load` finds the module of the
current hash only, so an upgrade of edge-spl, Python or numpy makes it stale and the kernels
fall back to the JIT until it is built again. It is compiled for the host CPU (like the JIT):
build it on the machine that runs it, do not copy the folder between CPU models.

The folder: --dir, else $EDGE_SPL_KERNEL_DIR, else $XDG_CACHE_HOME/edge-spl/kernels
(~/.cache/edge-spl/kernels).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings

log = logging.getLogger("edge_spl.device.aot")

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ("kernel_code.py", "aot.py")


def kernel_dir() -> str:
    d = os.environ.get("EDGE_SPL_KERNEL_DIR")
    if d:
        return d
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "edge-spl", "kernels")


def build_key() -> str:
    """Hash of everything the module's code depends on (read without importing numba)."""
    import numpy as np
    h = hashlib.sha256()
    for name in _SOURCES:
        with open(os.path.join(_HERE, name), "rb") as f:
            h.update(f.read())
    h.update(f"{sys.version}|{np.__version__}|{platform.machine()}|{sys.implementation.cache_tag}".encode())
    return h.hexdigest()[:16]


def module_name() -> str:
    return f"edge_spl_kernels_{build_key()}"


def module_path(folder: str | None = None) -> str:
    return os.path.join(folder or kernel_dir(), module_name() + importlib.machinery.EXTENSION_SUFFIXES[0])


def load(folder: str | None = None, required: bool = False):
    """The AOT kernel module for the current source, or None when there is none (or it does not
    load: logged). required=True raises instead of returning None."""
    path = module_path(folder)
    if not os.path.isfile(path):
        _warn_if_stale(os.path.dirname(path))
        if required:
            raise ImportError(f"no AOT kernel module {path} for this kernel source; build it with "
                              "`edge-spl compile`")
        return None
    name = os.path.basename(path).split(".")[0]
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    except (ImportError, OSError) as e:
        if required:
            raise
        log.warning("AOT kernel module %s does not load (%s); using numba's JIT", path, e)
        return None


def _warn_if_stale(folder: str) -> None:
    """A build of other sources (edge-spl, Python or numpy upgraded since) is a lost install
    step, not an error: say so, since the device then runs on the JIT and its larger footprint."""
    try:
        old = [p for p in os.listdir(folder) if p.startswith("edge_spl_kernels_")]
    except OSError:
        return
    if old:
        log.warning("the AOT kernel module in %s was built from other sources (%s); the kernels run on "
                    "numba's JIT until `edge-spl compile` builds it again", folder, old[0])


def _forwarder(kernel, n_args: int):
    """def f(a0, .., aN): return kernel(a0, .., aN) -- what pycc exports: pycc compiles its
    exported functions with default flags, and the kernel called from it keeps its own
    (error_model, fastmath), the same as under the JIT."""
    names = ", ".join(f"a{i}" for i in range(n_args))
    ns = {"kernel": kernel}
    exec(f"def forward({names}):\n    return kernel({names})\n", ns)   # noqa: S102 (fixed text)
    return ns["forward"]


def build(folder: str | None = None) -> str:
    """Compile every kernel that has a signature into FOLDER's module for the current source.
    Returns its path. Needs numba (with pycc), a C compiler, Python headers and setuptools."""
    import inspect

    import llvmlite.binding as llvm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # pycc is pending deprecation in numba; see docs/deploy.md
        from numba.pycc import CC

    from . import kernel_code
    kernel_code.compile_jit()
    folder = folder or kernel_dir()
    os.makedirs(folder, exist_ok=True)
    name = module_name()
    cc = CC(name)
    cc.target_cpu = llvm.get_host_cpu_name()   # as the JIT does: built on the machine that runs it
    cc.verbose = False
    for kname, (f, sig, _) in kernel_code.KERNELS.items():
        if sig is None:
            continue
        n_args = len(inspect.signature(f).parameters)
        cc.export(kname, sig)(_forwarder(getattr(kernel_code, kname), n_args))
    tmp = tempfile.mkdtemp(prefix=".tmp-aot-", dir=folder)
    try:
        cc.output_dir = tmp
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cc.compile()
        built = [p for p in os.listdir(tmp) if p.startswith(name)]
        if len(built) != 1:
            raise RuntimeError(f"pycc built {built} in {tmp}, expected one {name} module")
        path = module_path(folder)
        os.replace(os.path.join(tmp, built[0]), path)   # atomic: a loader never sees half a file
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in os.listdir(folder):   # stale builds of other sources
        if old.startswith("edge_spl_kernels_") and not old.startswith(name):
            try:
                os.unlink(os.path.join(folder, old))
            except OSError:
                pass
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_spl.device.aot",
                                 description="Build the device's kernels ahead of time (no numba at run time).")
    ap.add_argument("--dir", help="kernel folder (default: $EDGE_SPL_KERNEL_DIR or ~/.cache/edge-spl/kernels)")
    ap.add_argument("--check", action="store_true", help="only say whether a current module is there")
    args = ap.parse_args(argv)
    path = module_path(args.dir)
    if args.check:
        ok = os.path.isfile(path)
        print(f"{path}: {'present' if ok else 'missing (the kernels run on numba JIT)'}")
        return 0 if ok else 1
    t0 = time.perf_counter()
    try:
        path = build(args.dir)
    except Exception as e:   # no compiler, no headers, no pycc: the device still runs on the JIT
        print(f"AOT build failed ({type(e).__name__}: {e}); the device kernels stay on numba's JIT",
              file=sys.stderr)
        return 1
    print(f"built {path} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
