"""Start-up and footprint of `edge-spl device`, each run a real child process, offline:
time from process start to the first prediction line with an empty and with a warm numba cache,
and with the kernels compiled ahead of time (edge_spl.device.aot: no numba at run time); peak
RSS over the demo stream, and what the process imports (no torch)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from edge_spl.data import GAS_FEATURES, load_gas_file

# numba imports scipy, when it is installed, to find BLAS for np.linalg (which the device never
# uses); the [device] extra does not install scipy, so a real device never pays for it. This
# child-only hook makes scipy unimportable, to measure the device as installed.
_NO_SCIPY = '''import sys
class _NoScipy:
    def find_spec(self, name, path=None, target=None):
        if name == "scipy" or name.startswith("scipy."):
            raise ImportError("scipy is not installed on the device (bench speed)")
        return None
sys.meta_path.insert(0, _NoScipy())
'''


# Lists, at exit, the big packages the process imported (-X importtime also logs failed attempts).
_PROBE = '''import atexit, sys
def _report():
    mods = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "scipy", "paho", "numba", "onnxruntime"})
    sys.stderr.write("EDGE_SPL_BENCH_MODULES " + ",".join(mods) + "\\n")
atexit.register(_report)
'''

# ru_maxrss of a child counts its parent's RSS at fork time (Linux keeps the high-water mark
# across exec), and this benchmark's process holds torch. A small launcher (python -S) spawns
# the device instead and reports the device's own peak.
_LAUNCH = """import os, sys
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, ru = os.wait4(pid, 0)
sys.stderr.write("EDGE_SPL_BENCH_MAXRSS_KB %d\\n" % ru.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def write_inputs(work: str, gas_dir: str, stream_lines: int | None) -> dict:
    """A small CSV (start-up runs) and the demo stream, gas batches 2..6 as one .dat file."""
    b2 = load_gas_file(os.path.join(gas_dir, "batch2.dat"))
    small = os.path.join(work, "small.csv")
    with open(small, "w", encoding="utf-8") as f:
        f.write(",".join(GAS_FEATURES) + ",label\n")
        for x, y in zip(b2.X[:20], b2.y[:20]):
            f.write(",".join(f"{v:.6g}" for v in x) + f",{y}\n")
    stream = os.path.join(work, "stream.dat")
    n = 0
    with open(stream, "w", encoding="utf-8") as out:
        for b in range(2, 7):
            with open(os.path.join(gas_dir, f"batch{b}.dat"), encoding="utf-8") as f:
                for line in f:
                    if stream_lines is not None and n >= stream_lines:
                        break
                    out.write(line)
                    n += 1
    hooks = {}
    for name, code in (("probe", _PROBE), ("no_scipy", _NO_SCIPY + _PROBE)):
        hooks[name] = os.path.join(work, name)
        os.makedirs(hooks[name], exist_ok=True)
        with open(os.path.join(hooks[name], "sitecustomize.py"), "w", encoding="utf-8") as f:
            f.write(code)
    return {"small": small, "stream": stream, "stream_samples": n, **hooks}


def run_device(model_dir: str, source: str, state_dir: str, cache_dir: str, *, label: str | None = None,
               quiet: bool = False, hook: str | None = None, importtime: bool = False,
               rss: bool = False, timeout: float = 300.0, kernels: dict | None = None) -> dict:
    """One `edge-spl device` child. Returns seconds to its first stdout line and in total, and
    stderr; with rss=True it runs under the launcher and its own peak RSS is returned too.
    `hook`: a folder with a sitecustomize.py to put first on the child's PYTHONPATH.
    `kernels`: EDGE_SPL_KERNELS / EDGE_SPL_KERNEL_DIR for the child (default: forced JIT)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, PYTHONUNBUFFERED="1")
    env.update(kernels or {"EDGE_SPL_KERNELS": "jit"})
    if hook:
        env["PYTHONPATH"] = hook + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = ([sys.executable, "-S", "-c", _LAUNCH] if rss else []) + [sys.executable] + (
        ["-X", "importtime"] if importtime else []) + [
        "-m", "edge_spl", "device", "--id", "bench", "--source", source, "--state", state_dir,
        "--model", model_dir]
    if label:
        cmd += ["--label", label]
    if quiet:
        cmd += ["--quiet"]
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        first = p.stdout.readline()
        t_first = time.perf_counter() - t0
        deadline = t0 + timeout
        while p.stdout.read(1 << 16):
            if time.perf_counter() > deadline:
                p.kill()
                break
        p.wait()
        t_total = time.perf_counter() - t0
        p.stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"edge-spl device exited {p.returncode}: {stderr.strip()[-800:]}")
    out = {"first_line_s": t_first, "total_s": t_total, "first_line": first.decode(errors="replace").strip(),
           "stderr": stderr, "modules": None}
    for line in stderr.splitlines():
        if line.startswith("EDGE_SPL_BENCH_MAXRSS_KB "):
            out["peak_rss_mb"] = int(line.split()[1]) / 1024.0
        elif line.startswith("EDGE_SPL_BENCH_MODULES"):
            out["modules"] = [m for m in line.split(" ", 1)[1].split(",") if m] if " " in line else []
    return out


def imports_of(stderr: str, modules: list[str] | None) -> dict:
    """Which big packages the process had imported at exit (`modules`, from the probe), and
    from -X importtime output the cumulative import seconds of each."""
    cum: dict[str, float] = {}
    names = set()
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].strip()
        names.add(name)
        if name in ("numpy", "numba", "onnxruntime", "paho.mqtt.client", "scipy", "edge_spl.device.learner"):
            cum[name] = int(parts[1]) / 1e6
    if modules is None:
        raise RuntimeError("the device child did not report its modules (the probe hook did not run)")
    return {"modules": modules, "torch_imported": "torch" in modules, "scipy_imported": "scipy" in modules,
            "paho_imported": "paho" in modules, "numba_imported": "numba" in modules, "import_s": cum}


_NO_NUMBA = """import sys
import numpy as np
from edge_spl.device.session import OnnxModel
from edge_spl.manifest import ExportedModel
m = ExportedModel.load(sys.argv[1])
s = OnnxModel(m)
protos = [(P.copy(), g.copy()) for P, g in m.protos]
z = np.zeros((1, m.manifest.sizes[0]), np.float32)
for _ in range(2000):
    s.run(z, protos)
assert "numba" not in sys.modules
print("ok")
"""


def rss_without_numba(model_dir: str, hook: str | None) -> float:
    """Peak RSS of a child that does the device's inference (numpy, onnxruntime, the model) but
    imports no numba: what the process would take with ahead-of-time compiled kernels."""
    env = dict(os.environ)
    if hook:
        env["PYTHONPATH"] = hook + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-S", "-c", _LAUNCH, sys.executable, "-c", _NO_NUMBA, model_dir],
                       capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"no-numba child failed: {r.stderr.strip()[-500:]}")
    return int(r.stderr.split("EDGE_SPL_BENCH_MAXRSS_KB ")[1].split()[0]) / 1024.0


def build_aot(work: str) -> dict:
    """Build the AOT kernel module into a fresh folder, in a child (as a device's install step
    would); returns the folder and the build seconds, or why it could not be built."""
    folder = tempfile.mkdtemp(prefix="kernels-", dir=work)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "edge_spl.device.aot", "--dir", folder],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return {"skipped": (r.stderr or r.stdout).strip()[-500:]}
    return {"dir": folder, "build_s": time.perf_counter() - t0}


# (name, block scipy, kernels): the JIT in this venv; the JIT as a device installs it (no
# scipy); the AOT module as a device installs it (no scipy, no numba imported)
ENVIRONMENTS = (("dev_env", False, "jit"), ("device_install", True, "jit"), ("device_aot", True, "aot"))


def measure(model_dir: str, gas_dir: str, work: str, quick: bool, rounds: int) -> dict:
    """Cold and warm starts (fresh NUMBA_CACHE_DIR, then the same one again), in this
    environment, with scipy hidden (a device install), and with the AOT kernels; peak RSS over
    the demo stream."""
    inp = write_inputs(work, gas_dir, 300 if quick else None)
    out: dict = {"stream_samples": inp["stream_samples"], "aot_build": build_aot(work)}
    for env_name, no_scipy, backend in ENVIRONMENTS:
        if backend == "aot":
            if "skipped" in out["aot_build"]:
                out[env_name] = {"skipped": out["aot_build"]["skipped"]}
                continue
            kernels = {"EDGE_SPL_KERNELS": "aot", "EDGE_SPL_KERNEL_DIR": out["aot_build"]["dir"]}
        else:
            kernels = {"EDGE_SPL_KERNELS": "jit"}
        blocker = inp["no_scipy"] if no_scipy else None
        probe = blocker or inp["probe"]
        colds, warms = [], []
        for r in range(1 if quick else max(1, min(rounds, 3))):
            cache = tempfile.mkdtemp(prefix="numba-cache-", dir=work)
            state = tempfile.mkdtemp(prefix="state-", dir=work)
            cold = run_device(model_dir, inp["small"], state, cache, label="label", hook=blocker, kernels=kernels)
            colds.append(cold["first_line_s"])
            for _ in range(2):
                warm = run_device(model_dir, inp["small"], tempfile.mkdtemp(prefix="state-", dir=work),
                                  cache, label="label", hook=blocker, kernels=kernels)
                warms.append(warm["first_line_s"])
        out[env_name] = {"kernels": backend, "cold_start_s": float(np.median(colds)),
                         "warm_start_s": float(np.median(warms)), "cold_runs_s": colds, "warm_runs_s": warms}
        rss = run_device(model_dir, inp["stream"], tempfile.mkdtemp(prefix="state-", dir=work), cache,
                         quiet=True, hook=blocker, rss=True, kernels=kernels)
        out[env_name]["peak_rss_mb"] = rss["peak_rss_mb"]
        out[env_name]["peak_rss_without_numba_mb"] = rss_without_numba(model_dir, blocker)
        out[env_name]["stream_s"] = rss["total_s"]
        it = run_device(model_dir, inp["small"], tempfile.mkdtemp(prefix="state-", dir=work), cache,
                        label="label", hook=probe, importtime=True, kernels=kernels)
        out[env_name]["imports"] = imports_of(it["stderr"], it["modules"])
    return out
