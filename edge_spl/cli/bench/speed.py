"""`edge-spl bench speed`: how fast the device learns and predicts, how fast it starts, how much
memory it takes, how small its deltas are and how fast the server merges them -- each against
the alternatives and this machine's limits, in one process run (children for start-up), the
alternatives interleaved round by round, medians over rounds, one thread unless stated.

Writes OUT/bench_speed.json and prints the tables; docs/bench-speed.md says what every figure is.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

from edge_spl.errors import EdgeSplError
from edge_spl.files import atomic_write_bytes

from . import speed_infer as SI
from . import speed_learn as SL
from . import speed_start as SS
from . import speed_sync as SY
from .speed_time import Roofline, latencies, peak_gemm_flops, per_call

MODELS = {"demo": [128, 256, 256, 6], "large": [561, 512, 512, 6]}
QUICK_MODELS = {"demo": [16, 32, 32, 6], "large": [24, 48, 48, 6]}
SCALE_WIDTHS = [128, 256, 512, 1024]
IMPLS = ("edge-spl", "numpy", "torch")
# (name, hidden learning, replay (None: the learner's default), batches): the default learner,
# the same without latent replay (batch 1 only: a mini-batch step never replays), hidden FF on
VARIANTS = (("head", False, None, ("1", "32")), ("head_replay0", False, 0, ("1",)), ("hidden", True, None, ("1", "32")))
TARGETS = {"learn_vs_torch": 5.0, "learn_vs_numpy": 5.0, "roofline_fraction": 0.40,
           "live_vs_baked": 1.2, "warm_start_s": 1.0, "device_peak_rss_mb": 150.0,
           "delta_bytes_ratio": 0.25, "accuracy_cost_points": 0.5}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args) -> int:
    from edge_spl.cli import default_gas_dir

    gas = default_gas_dir()
    if gas is None:
        raise EdgeSplError("gas drift data not found at ../shared/data/gas-sensor-drift (needed for "
                           "the start-up stream and the sync accuracy); run from the repo's folder")
    rounds = max(1, args.rounds if args.rounds else (2 if args.quick else 7))
    os.makedirs(args.out, exist_ok=True)
    import torch
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="bench-speed-")
    t0 = time.perf_counter()
    from edge_spl.device import kernels
    res: dict = {"machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
                 "kernels": kernels.BACKEND,   # the learn step in this process: numba JIT or the AOT module
                 "quick": bool(args.quick), "rounds": rounds}
    try:
        res.update(_run(args, gas, rounds, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t0
    res["targets"] = targets(res)
    atomic_write_bytes(os.path.join(args.out, "bench_speed.json"), json.dumps(res, indent=1).encode())
    print_tables(res)
    print(f"\nwrote {os.path.join(args.out, 'bench_speed.json')} in {res['seconds']:.0f} s")
    return 0


def _run(args, gas: str, rounds: int, work: str) -> dict:
    quick = args.quick
    models = QUICK_MODELS if quick else MODELS
    block = 0.003 if quick else 0.03
    out: dict = {"models": models}

    say("roofline: peak fp32 GEMM (child process), cache bandwidth ...")
    roof = Roofline(peak_gemm_flops(256 if quick else 1024, 2 if quick else 5), 0.002 if quick else 0.02)

    say("learn step ...")
    learn = {m: learn_step(sizes, rounds, block, roof) for m, sizes in models.items()}
    out["learn_step"] = learn
    for variant, _, _, batches in VARIANTS:
        key = "" if variant == "head" else "_" + variant
        out["learn_step" + key + "_per_s"] = {m: {b: {i: learn[m][variant][b][i]["samples_per_s"]
                                                       for i in IMPLS} for b in batches} for m in models}
        out["roofline_fraction" + key] = {m: {b: {"edge-spl": learn[m][variant][b]["edge-spl"]["roofline_fraction"]}
                                              for b in batches} for m in models}

    say("scaling with layer width ...")
    widths = [16, 32] if quick else SCALE_WIDTHS
    out["scale"] = {str(w): {v: scale_point([w, w, w, 6], v == "hidden", rounds, block)
                             for v in ("head", "hidden")} for w in widths}

    say("inference and whole device step ...")
    out["inference"] = {m: inference(sizes, rounds, quick) for m, sizes in models.items()}
    out["inference_p50_us"] = {m: {k: v["batch1"]["p50_us"] for k, v in out["inference"][m]["impl"].items()}
                               for m in models}
    out["device_step"] = {m: device_step(sizes, rounds, quick) for m, sizes in models.items()}
    out["roofline"] = roof.table()

    say("start-up and footprint (child processes) ...")
    model_dir = os.path.join(work, "model")
    start_sizes = [128, 16, 16, 6] if quick else MODELS["demo"]
    _save_gas_model(gas, start_sizes, model_dir)
    st = SS.measure(model_dir, gas, work, quick, rounds)
    out["startup"] = st
    out["warm_start_s"] = st["dev_env"]["warm_start_s"]
    out["cold_start_s"] = st["dev_env"]["cold_start_s"]
    # the device as deployed: with the AOT kernels when they could be built (docs/deploy.md)
    deployed = "device_aot" if "skipped" not in st["device_aot"] else "dev_env"
    out["device_peak_rss_mb"] = st[deployed]["peak_rss_mb"]
    out["device_peak_rss_from"] = deployed
    out["device_peak_rss_jit_mb"] = st["dev_env"]["peak_rss_mb"]
    if deployed == "device_aot":
        out["aot_start_s"] = st["device_aot"]["warm_start_s"]

    say("sync: delta bytes and encodings ...")
    out["sync"] = sync_section(gas, quick)
    out["delta_bytes_ratio"] = out["sync"]["head"]["f32"]["delta_bytes_ratio"]

    say("server: merge rate on the MQTT broker ...")
    out["server"] = server_section(args, model_dir, work, quick)
    return out


# -- sections ---------------------------------------------------------------------------------------

def learn_step(sizes, rounds: int, block: float, roof: Roofline) -> dict:
    _, exported = SL.make_model(sizes)
    res = {}
    for variant, hidden, replay, batches in VARIANTS:
        res[variant] = {"replay": SL.HP["replay"] if replay is None else replay}
        for b in map(int, batches):
            pool = SL.sample_pool(SL.learner_for(exported, hidden), b, hidden)
            impls = {"edge-spl": SL.EdgeSplLearn(exported, hidden, b, replay),
                     "numpy": SL.NumpyLearn(exported, hidden, b, replay),
                     "torch": SL.TorchLearn(exported, hidden, b, replay)}
            pools = {k: (impls[k].convert(pool) if k == "torch" else pool) for k in impls}
            # the same math: run each from the same start over the same samples, compare
            check = {k: type(v)(exported, hidden, b, replay) for k, v in impls.items()}
            for j in range(8):
                for k, c in check.items():
                    c.step(pools[k][j])
            diff = {k: SL.max_diff(check["edge-spl"].protos, check[k].protos) for k in ("numpy", "torch")}
            counters = {k: [0] for k in impls}

            def stepper(k):
                impl, items, c = impls[k], pools[k], counters[k]

                def f():
                    impl.step(items[c[0] % SL.POOL])
                    c[0] += 1
                return f
            t = per_call({k: stepper(k) for k in impls}, rounds, block)
            w = SL.work(sizes, hidden, b, pool, replay)
            t_min = roof.t_min(w["flops"], w["bytes"], w["working_set_bytes"])
            res[variant][str(b)] = {k: {"us_per_step": t[k] * 1e6, "samples_per_s": b / t[k],
                                        "roofline_fraction": t_min / t[k]} for k in impls}
            res[variant][str(b)]["work"] = dict(w, roofline_us=t_min * 1e6,
                                                bandwidth_gbs=roof.bandwidth(w["working_set_bytes"]) / 1e9)
            res[variant][str(b)]["max_abs_diff_vs_edge_spl"] = diff
    return res


def scale_point(sizes, hidden: bool, rounds: int, block: float) -> dict:
    _, exported = SL.make_model(sizes)
    pool = SL.sample_pool(SL.learner_for(exported, hidden), 1, hidden)
    impls = {"edge-spl": SL.EdgeSplLearn(exported, hidden, 1), "numpy": SL.NumpyLearn(exported, hidden, 1),
             "torch": SL.TorchLearn(exported, hidden, 1)}
    pools = {k: (impls[k].convert(pool) if k == "torch" else pool) for k in impls}
    counters = {k: [0] for k in impls}

    def stepper(k):
        impl, items, c = impls[k], pools[k], counters[k]

        def f():
            impl.step(items[c[0] % SL.POOL])
            c[0] += 1
        return f
    t = per_call({k: stepper(k) for k in impls}, max(1, rounds // 2), block)
    return {k: t[k] * 1e6 for k in impls}


def inference(sizes, rounds: int, quick: bool) -> dict:
    import torch
    state, exported = SL.make_model(sizes)
    protos = [(P.copy(), g.copy()) for P, g in exported.protos]
    rng = np.random.default_rng(0)
    res = {"impl": {}}
    calls = 100 if quick else 1000
    for n in (1, 256):
        z = np.clip(rng.standard_normal((n, sizes[0])), -10, 10).astype(np.float32)
        zt = torch.from_numpy(z.copy())
        dev = SI.OnnxModel(exported)
        baked = SI.BakedModel(exported.onnx_bytes, protos, sizes, n)
        plain = SI.PlainRunModel(exported.onnx_bytes, len(sizes) - 1)
        eager = SI.TorchEager(state)
        alts = {"edge-spl": lambda: dev.run(z, protos), "ort_baked": lambda: baked.run(z),
                "ort_live_run": lambda: plain.run(z, protos), "torch": lambda: eager.run(zt)}
        if n == 1:
            lat = latencies(alts, rounds, calls)
            for k, v in lat.items():
                res["impl"].setdefault(k, {})["batch1"] = v
        else:
            t = per_call(alts, rounds, 0.01 if quick else 0.1)
            for k, v in t.items():
                res["impl"].setdefault(k, {})["batch256_samples_per_s"] = n / v
    res["max_abs_logit_diff_vs_edge_spl"] = SI.agreement(state, exported, protos, z[:8])
    p = res["impl"]
    res["live_vs_baked_p50"] = p["edge-spl"]["batch1"]["p50_us"] / p["ort_baked"]["batch1"]["p50_us"]
    return res


def device_step(sizes, rounds: int, quick: bool) -> dict:
    """FFLearner.step on raw samples: standardise, one onnxruntime call, predict, FF update."""
    _, exported = SL.make_model(sizes)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((SL.POOL, sizes[0])).astype(np.float32)
    y = rng.integers(sizes[-1], size=SL.POOL)
    learners = {v: SL.learner_for(exported, hidden, replay) for v, hidden, replay, _ in VARIANTS}
    counters = {v: [0] for v in learners}

    def stepper(v):
        L, c = learners[v], counters[v]

        def f():
            i = c[0] % SL.POOL
            L.step(X[i], int(y[i]))
            c[0] += 1
        return f
    return latencies({v: stepper(v) for v in learners}, rounds, 100 if quick else 1000)


def _save_gas_model(gas: str, sizes, model_dir: str) -> None:
    from edge_spl.data import load_gas_file
    from edge_spl.export.onnx_export import export_model
    from edge_spl.model import init_model
    b1 = load_gas_file(os.path.join(gas, "batch1.dat"))
    state = SL.as_trained(init_model(list(sizes), b1.X.mean(0), b1.X.std(0) + 1e-3, b1.classes(),
                                     b1.feature_names, seed=0, model_id="bench-speed"))
    os.makedirs(model_dir, exist_ok=True)
    export_model(state).save(model_dir)


def sync_section(gas: str, quick: bool) -> dict:
    """A model pretrained on gas batch 1, one device streaming batches 2..6 (shuffled, every label
    revealed after its prediction), a delta every 100 samples merged and adopted at once."""
    from edge_spl.export.onnx_export import export_model
    from edge_spl.export.pretrain import pretrain

    from .streams import load_gas_task, make_stream
    task = load_gas_task(os.path.dirname(gas))
    state, _ = pretrain(task.train, hidden=(16, 16) if quick else (256, 256), epochs=2 if quick else 60,
                        holdout=0.0, seed=0, progress=False)
    exported = export_model(state)
    exported.manifest.onnx_sha256 = "c" * 64
    stream = make_stream(task, "shuffled", seed=0, limit=40 if quick else None)
    res = {"samples": int(len(stream.y)), "sizes": state.sizes}
    for config, lr_hidden in (("head", 0.0), ("hidden", 0.001)):
        res[config] = {enc: SY.sync_stream(exported, stream.X, stream.y, enc, lr_hidden) for enc in SY.ENCODINGS}
        base = res[config]["f32"]["accuracy"]
        for enc in SY.ENCODINGS:
            res[config][enc]["accuracy_cost_points"] = 100.0 * (base - res[config][enc]["accuracy"])
    return res


def server_section(args, model_dir: str, work: str, quick: bool) -> dict:
    from edge_spl.manifest import ExportedModel
    host, port = getattr(args, "broker", None) or ("127.0.0.1", 1883)
    delta = template_delta(ExportedModel.load(model_dir))
    try:
        return SY.server_rate(model_dir, os.path.join(work, "server"), (host, port), delta,
                              n_devices=10 if quick else 200, per_device=2 if quick else 5,
                              timeout=30.0 if quick else 120.0)
    except Exception as e:   # no broker, or a broken server: report it, keep the other figures
        say(f"server section skipped: {type(e).__name__}: {e}")
        return {"skipped": f"{type(e).__name__}: {e}"}


def template_delta(exported):
    """A real delta to send: what the default learner pushes after 100 labelled samples."""
    from edge_spl.device.learner import FFLearner
    L = FFLearner(exported, device_id="template")
    rng = np.random.default_rng(2)
    mean, std = np.asarray(exported.manifest.mean), np.asarray(exported.manifest.std)
    for _ in range(100):
        L.step((mean + std * rng.standard_normal(len(mean))).astype(np.float32),
               int(rng.integers(exported.manifest.sizes[-1])))
    return L.make_delta()


# -- verdicts and tables ----------------------------------------------------------------------------

def targets(res: dict) -> dict:
    """The issue's done-when figures, each with its value, the bar and whether it is met."""
    T = {}
    if "learn_step" not in res:
        return T
    for variant, _, _, _ in VARIANTS:
        d = res["learn_step"]["demo"][variant]["1"]
        T[f"learn_vs_torch_{variant}"] = _t(d["edge-spl"]["samples_per_s"] / d["torch"]["samples_per_s"],
                                            ">=", TARGETS["learn_vs_torch"])
        T[f"learn_vs_numpy_{variant}"] = _t(d["edge-spl"]["samples_per_s"] / d["numpy"]["samples_per_s"],
                                            ">=", TARGETS["learn_vs_numpy"])
        T[f"roofline_fraction_{variant}"] = _t(d["edge-spl"]["roofline_fraction"], ">=", TARGETS["roofline_fraction"])
    T["live_vs_baked_p50"] = _t(res["inference"]["demo"]["live_vs_baked_p50"], "<=", TARGETS["live_vs_baked"])
    for env, _, backend in SS.ENVIRONMENTS:
        s = res["startup"][env]
        if "skipped" in s:
            continue
        T[f"warm_start_s_{env}"] = _t(s["warm_start_s"], "<", TARGETS["warm_start_s"])
        T[f"device_peak_rss_mb_{env}"] = _t(s["peak_rss_mb"], "<", TARGETS["device_peak_rss_mb"])
        T[f"no_torch_in_device_{env}"] = _t(float(s["imports"]["torch_imported"]), "==", 0.0)
        if backend == "aot":
            T[f"no_numba_in_device_{env}"] = _t(float(s["imports"]["numba_imported"]), "==", 0.0)
    for config in ("head", "hidden"):
        f32 = res["sync"][config]["f32"]
        T[f"delta_bytes_ratio_{config}"] = _t(f32["delta_bytes_ratio"], "<=", TARGETS["delta_bytes_ratio"])
        best = min((e for e in SY.ENCODINGS
                    if res["sync"][config][e]["delta_bytes_ratio"] <= TARGETS["delta_bytes_ratio"]),
                   key=lambda e: res["sync"][config][e]["accuracy_cost_points"], default=None)
        if best is not None:
            T[f"accuracy_cost_points_{config}_{best}"] = _t(res["sync"][config][best]["accuracy_cost_points"], "<=",
                                                            TARGETS["accuracy_cost_points"])
    return T


def _t(value: float, op: str, bar: float) -> dict:
    met = {">=": value >= bar, "<=": value <= bar, "<": value < bar, "==": value == bar}[op]
    return {"value": value, "target": f"{op} {bar:g}", "met": bool(met)}


def _row(cells, widths) -> str:
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def _table(title: str, head: list, rows: list) -> None:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    print(f"\n{title}")
    print(_row(head, widths))
    print(_row(["-" * w for w in widths], widths))
    for r in rows:
        print(_row(r, widths))


def print_tables(res: dict) -> None:
    print(f"edge-spl bench speed: {res['machine']['cpu']}, {res['rounds']} rounds, kernels: {res['kernels']}"
          f"{' (quick: tiny sizes, figures mean nothing)' if res['quick'] else ''}")
    roof = res["roofline"]
    print(f"1-core roofline: peak fp32 GEMM {roof['peak_fp32_gflops']:.1f} GFLOP/s ({roof['peak_from']}); "
          "read+write bandwidth by working set: "
          + ", ".join(f"{int(k) >> 10} KiB {v:.0f} GB/s" for k, v in roof["bandwidth_gbs_by_working_set"].items()))
    rows = []
    for m, sizes in res["models"].items():
        for variant, _, _, batches in VARIANTS:
            for b in batches:
                d = res["learn_step"][m][variant][b]
                rows.append([f"{m} {'-'.join(map(str, sizes))}", variant, b]
                            + [f"{d[i]['samples_per_s']:,.0f}" for i in IMPLS]
                            + [f"{d['edge-spl']['samples_per_s'] / d['numpy']['samples_per_s']:.1f}x",
                               f"{d['edge-spl']['samples_per_s'] / d['torch']['samples_per_s']:.1f}x",
                               f"{d['edge-spl']['us_per_step']:.2f}", f"{d['work']['roofline_us']:.2f}",
                               f"{d['edge-spl']['roofline_fraction']:.0%}"])
    _table("Learn step (samples learned per second; batch 32 = one mini-batch step of 32 samples)",
           ["model", "variant", "batch", "edge-spl", "numpy", "torch", "vs numpy", "vs torch",
            "edge-spl us", "roofline us", "of roofline"], rows)
    widths = list(res["scale"])
    _table("Learn step vs layer width (model W-W-W-6, batch 1, us per sample)",
           ["width"] + [f"{v} {i}" for v in ("head", "hidden") for i in IMPLS],
           [[w] + [f"{res['scale'][w][v][i]:.1f}" for v in ("head", "hidden") for i in IMPLS] for w in widths])
    rows = []
    for m in res["models"]:
        inf = res["inference"][m]["impl"]
        for k in ("edge-spl", "ort_baked", "ort_live_run", "torch"):
            rows.append([m, k, f"{inf[k]['batch1']['p50_us']:.1f}", f"{inf[k]['batch1']['p99_us']:.1f}",
                         f"{inf[k]['batch256_samples_per_s']:,.0f}"])
    _table("Inference (edge-spl = the device: onnxruntime fed the live P, g; ort_baked = P, g as initializers; "
           "ort_live_run = the device's call before this benchmark)",
           ["model", "impl", "b1 p50 us", "b1 p99 us", "b256 samples/s"], rows)
    print("live / baked p50: " + ", ".join(f"{m} {res['inference'][m]['live_vs_baked_p50']:.2f}x"
                                          for m in res["models"]))
    _table("Whole device step (FFLearner.step: raw sample in, prediction out, FF update done; 1 core)",
           ["model", "variant", "p50 us", "p99 us"],
           [[m, v, f"{d['p50_us']:.1f}", f"{d['p99_us']:.1f}"] for m, dd in res["device_step"].items()
            for v, d in dd.items()])
    st = res["startup"]
    rows = []
    for env, _, backend in SS.ENVIRONMENTS:
        e = st[env]
        if "skipped" in e:
            rows.append([env, backend, "skipped"] + [""] * 10)
            continue
        rows.append([env, backend, f"{e['cold_start_s']:.2f}", f"{e['warm_start_s']:.2f}", f"{e['peak_rss_mb']:.0f}",
                     f"{e['peak_rss_without_numba_mb']:.0f}"]
                    + ["yes" if e["imports"][f"{k}_imported"] else "no" for k in ("torch", "scipy", "paho", "numba")]
                    + [f"{e['imports']['import_s'].get(k, float('nan')):.2f}" for k in ("numpy", "numba", "onnxruntime")])
    ab = st["aot_build"]
    _table(f"Start-up and footprint (edge-spl device, offline; RSS over {st['stream_samples']} samples; "
           + (f"AOT kernels built in {ab['build_s']:.1f} s)" if "build_s" in ab else f"AOT build skipped: {ab['skipped']})"),
           ["environment", "kernels", "cold start s", "warm start s", "peak RSS MB", "RSS no numba", "torch", "scipy",
            "paho", "numba", "numpy s", "numba s", "onnxruntime s"], rows)
    sy = res["sync"]
    _table(f"Sync (one device, {sy['samples']} gas samples, a delta per 100; dense f32 = all P, g as float32)",
           ["learning", "encoding", "delta bytes", "of dense", "release bytes", "max rel err", "accuracy",
            "cost (points)"],
           [[c, e, f"{sy[c][e]['delta_bytes_mean']:,.0f}", f"{sy[c][e]['delta_bytes_ratio']:.3f}",
             f"{sy[c][e]['release_bytes']:,.0f}", f"{sy[c][e]['max_rel_error']:.1e}", f"{sy[c][e]['accuracy']:.1%}",
             f"{sy[c][e]['accuracy_cost_points']:+.2f}"] for c in ("head", "hidden") for e in SY.ENCODINGS])
    sv = res["server"]
    if "skipped" in sv:
        print(f"\nServer: skipped ({sv['skipped']})")
    else:
        print(f"\nServer ({sv['devices']} simulated devices, {sv['deltas_sent']} deltas of {sv['delta_bytes']} B, "
              f"real broker): {sv['merged_per_s']:,.0f} deltas merged/s end to end, "
              f"{sv['merge_only_per_s']:,.0f}/s in merge rounds, merge-to-publish p50 "
              f"{sv['merge_to_publish_p50_ms']:.1f} ms, p99 {sv['merge_to_publish_p99_ms']:.1f} ms"
              f"{'' if sv['complete'] else ' (INCOMPLETE)'}")
    _table("Targets", ["figure", "value", "target", "met"],
           [[k, f"{v['value']:.3g}", v["target"], "yes" if v["met"] else "NO"] for k, v in res["targets"].items()])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
