"""`edge-spl export MODEL_DIR`: write model.onnx, prototypes.npz and manifest.json beside the
trained model, then (unless --no-check) run onnxruntime against the torch model on the same inputs;
an export that fails the check, or is interrupted, is removed again."""
from __future__ import annotations

import os

import numpy as np

from edge_spl.errors import ModelError
from edge_spl.manifest import ONNX_FILE, ExportedModel, input_names, output_names, remove_export
from edge_spl.model import ModelState
from edge_spl.spl import Z_CLIP

ATOL = 1e-4
RTOL = 1e-4
SWITCH_EPS = 1e-4  # rows with a hidden routing this close to 0 may flip a mask on float rounding


def random_inputs(d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Standardised-looking rows, some at the clip limits."""
    return np.clip(rng.standard_normal((n, d)) * 2.0, -Z_CLIP, Z_CLIP).astype(np.float32)


def perturbed(protos, rng: np.random.Generator):
    return [((P + 0.3 * rng.standard_normal(P.shape)).astype(np.float32),
             (g + 0.3 * rng.standard_normal(g.shape)).astype(np.float32)) for P, g in protos]


def compare(state: ModelState, onnx_bytes: bytes, protos, z: np.ndarray) -> dict:
    """Run the ONNX graph (fed `protos`) and the torch SPLModel (holding `protos`) on z.
    Rows whose torch routing sits within SWITCH_EPS of a switch are left out, since a rounding
    difference there legitimately flips a hard mask. Returns the worst differences."""
    import onnxruntime as ort
    import torch

    from edge_spl.export.spl_torch import SPLModel

    n_layers = len(state.layers)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    feed = dict(zip(input_names(n_layers), [z] + [a for P, g in protos for a in (P, g)]))
    got = dict(zip(output_names(n_layers), sess.run(output_names(n_layers), feed)))

    model = SPLModel.from_state(state.with_prototypes(protos))
    with torch.no_grad():
        tr = model.trace(torch.from_numpy(z))
    want = {"logits": tr.logits.numpy()}
    want.update({f"h{i}": tr.hs[i].numpy() for i in range(1, n_layers)})
    want.update({f"r{i}": tr.rs[i].numpy() for i in range(n_layers - 1)})

    keep = np.ones(len(z), bool)
    for r in tr.rs:
        keep &= np.abs(r.numpy()).min(axis=1) > SWITCH_EPS
    if not keep.any():
        raise ModelError("every check row has a routing value at a switch point; cannot compare")
    worst_excess = -np.inf
    for name, w in want.items():
        diff = np.abs(got[name][keep] - w[keep])
        worst_excess = max(worst_excess, float((diff - (ATOL + RTOL * np.abs(w[keep]))).max()))
    logit_diff = float(np.abs(got["logits"][keep] - want["logits"][keep]).max())
    return {"logit_diff": logit_diff, "ok": worst_excess <= 0.0, "rows": int(keep.sum()),
            "skipped": int((~keep).sum())}


def check_export(state: ModelState, model_dir: str, n: int = 512, seed: int = 0) -> dict:
    """Read the exported files back and compare onnxruntime with torch on random inputs, with the
    saved prototypes and with perturbed ones (P and g are graph inputs, so both must match)."""
    exported = ExportedModel.load(model_dir)
    rng = np.random.default_rng(seed)
    z = random_inputs(state.sizes[0], n, rng)
    runs = [compare(state, exported.onnx_bytes, exported.protos, z),
            compare(state, exported.onnx_bytes, perturbed(exported.protos, rng), z)]
    return {"logit_diff": max(r["logit_diff"] for r in runs), "ok": all(r["ok"] for r in runs),
            "rows": sum(r["rows"] for r in runs), "skipped": sum(r["skipped"] for r in runs)}


def run(args) -> int:
    from edge_spl.export.onnx_export import export_model

    state = ModelState.load(args.model_dir)
    exported = export_model(state)
    # An export that is not written whole, fails its check or is interrupted is removed: the
    # files agree with each other, so a device or server would otherwise run them.
    try:
        exported.save(args.model_dir)
        res = None if args.no_check else check_export(state, args.model_dir)
    except OSError as e:
        remove_export(args.model_dir)
        raise ModelError(f"{args.model_dir}: cannot write the export ({e.strerror})") from None
    except BaseException:
        remove_export(args.model_dir)
        raise
    if res is not None and not res["ok"]:
        remove_export(args.model_dir)
        raise ModelError(f"onnxruntime and torch disagree on {args.model_dir}: max |logit diff| "
                         f"{res['logit_diff']:.2e} exceeds {ATOL:g} + {RTOL:g}*|logit|; the export was removed")
    size_kb = os.path.getsize(os.path.join(args.model_dir, ONNX_FILE)) / 1024
    shape = "-".join(map(str, state.sizes))
    line = (f"exported {state.model_id} {shape} to {args.model_dir} "
            f"(model.onnx {size_kb:.0f} kB, opset {exported.manifest.opset}, prototypes.npz, manifest.json)")
    if res is None:
        print(line + ", not checked")
        return 0
    print(f"{line}; onnxruntime vs torch max |logit diff| {res['logit_diff']:.1e} "
          f"on {res['rows']} rows (tolerance {ATOL:g} + {RTOL:g}*|logit|)")
    return 0
