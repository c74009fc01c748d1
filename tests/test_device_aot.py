"""The kernels compiled ahead of time (edge_spl.device.aot): built from the kernel source, loaded
by a device process that never imports numba, computing what the JIT computes; a build of
other sources is never loaded."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_model

from edge_spl.device import aot
from edge_spl.export.onnx_export import export_model

# a device in a child process: the learner (hidden FF on, replay on) over a seeded stream
_CHILD = r"""
import json, sys
import numpy as np
from edge_spl.device import kernels
from edge_spl.device.learner import FFLearner
from edge_spl.manifest import ExportedModel
L = FFLearner(ExportedModel.load(sys.argv[1]), lr_hidden=0.01, replay=4, replay_size=6)
rng = np.random.default_rng(0)
preds = [L.step(rng.standard_normal(8).astype(np.float32) * 2, int(rng.integers(3)))[0] for _ in range(80)]
np.savez(sys.argv[2], *[a for P, g in L.protos_ for a in (P, g)], vP=L.vP_, ring=L.replay_u_)
print(json.dumps({"backend": kernels.BACKEND, "numba": "numba" in sys.modules,
                  "llvmlite": "llvmlite" in sys.modules, "preds": preds, "state": L.head_state_.tolist()}))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    # the AOT build is an optional install step; without a C compiler the device runs on the JIT
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler: the AOT build cannot run here")
    folder = tmp_path_factory.mktemp("kernels")
    stale = folder / ("edge_spl_kernels_0123456789abcdef" + ".so")
    stale.write_bytes(b"an old build")
    path = aot.build(str(folder))
    return folder, path, stale


def _device(model_dir, out, kernels: dict) -> dict:
    env = dict(os.environ, **kernels)
    r = subprocess.run([sys.executable, "-c", _CHILD, str(model_dir), str(out)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_an_aot_device_imports_no_numba_and_computes_what_the_jit_does(built, tmp_path):
    folder, path, stale = built
    assert os.path.isfile(path) and not stale.exists()           # the stale build was removed
    exported = export_model(make_model((8, 16, 16, 3)))
    exported.save(str(tmp_path / "model"))
    a = _device(tmp_path / "model", tmp_path / "aot.npz", {"EDGE_SPL_KERNELS": "aot",
                                                          "EDGE_SPL_KERNEL_DIR": str(folder)})
    j = _device(tmp_path / "model", tmp_path / "jit.npz", {"EDGE_SPL_KERNELS": "jit"})
    assert (a["backend"], a["numba"], a["llvmlite"]) == ("aot", False, False)
    assert (j["backend"], j["numba"]) == ("jit", True)
    assert a["preds"] == j["preds"] and a["state"] == j["state"]
    with np.load(tmp_path / "aot.npz") as fa, np.load(tmp_path / "jit.npz") as fj:
        assert sorted(fa.files) == sorted(fj.files)
        for k in fa.files:
            np.testing.assert_allclose(fa[k], fj[k], rtol=1e-6, atol=1e-7)
    # auto picks the AOT module when it is there
    assert _device(tmp_path / "model", tmp_path / "auto.npz", {"EDGE_SPL_KERNELS": "auto",
                                                              "EDGE_SPL_KERNEL_DIR": str(folder)})["backend"] == "aot"


def test_no_module_falls_back_to_the_jit_and_required_says_how_to_build(tmp_path):
    assert aot.load(str(tmp_path)) is None
    with pytest.raises(ImportError, match="edge-spl compile"):
        aot.load(str(tmp_path), required=True)
    assert aot.main(["--dir", str(tmp_path), "--check"]) == 1


def test_a_module_is_found_only_for_its_own_sources(built, monkeypatch, caplog):
    folder, path, _ = built
    assert aot.load(str(folder)) is not None
    assert os.path.basename(path).startswith(aot.module_name())
    monkeypatch.setattr(np, "__version__", np.__version__ + ".post1")   # another numpy: another key
    assert not os.path.basename(path).startswith(aot.module_name())
    assert aot.load(str(folder)) is None
    assert "built from other sources" in caplog.text


def test_a_broken_module_file_is_logged_and_skipped(tmp_path, caplog):
    open(aot.module_path(str(tmp_path)), "wb").write(b"not a shared object")
    assert aot.load(str(tmp_path)) is None
    assert "does not load" in caplog.text


def test_edge_spl_compile_builds_and_checks(built, tmp_path, capsys):
    from edge_spl.cli import main

    folder, path, _ = built
    assert main(["compile", "--dir", str(folder), "--check"]) == 0
    assert "present" in capsys.readouterr().out
    assert main(["compile", "--dir", str(tmp_path), "--check"]) == 1
    assert "missing" in capsys.readouterr().out
    assert main(["compile", "--dir", str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out
    assert "built" in out and os.path.isfile(aot.module_path(str(tmp_path / "new")))
    # current already: a quick no-op (a service runs it before every start), unless --force
    assert main(["compile", "--dir", str(tmp_path / "new")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["compile", "--dir", str(tmp_path / "new"), "--force"]) == 0
    assert "built" in capsys.readouterr().out


def test_edge_spl_compile_prints_its_own_lines_only(built, tmp_path):
    """setuptools logs every gcc call at INFO: not shown unless --verbose."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "edge_spl", "compile", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "built" in r.stdout, r.stderr
    assert r.stderr.strip() == "", r.stderr
