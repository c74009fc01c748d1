"""Tables (stdout) and the plot of `edge-spl bench adapt`, from its result dict."""
from __future__ import annotations

from .learners import LEARNERS
from .streams import DATASETS, REGIMES

TITLES = {"gas": "gas drift: pretrain batch 1, stream batches 2..6",
          "occupancy": "occupancy: pretrain datatraining.txt, stream datatest2.txt (batches = days)"}


def _cell(entry: dict | None, key: str, sd: bool) -> str:
    if entry is None:
        return "—"
    if sd and len(entry.get("seeds", [])) > 1:
        return f"{entry[key]:.1f} ± {entry['sd_' + key.split('_')[1]]:.1f}"
    return f"{entry[key]:.1f}"


def _learners(block: dict) -> list[str]:
    present = {n for order in block.values() for reg in order.values() for n in reg}
    return [n for n in LEARNERS if n in present]


def print_tables(result: dict) -> None:
    for ds in DATASETS:
        block = result.get(ds)
        if not block:
            continue
        n_seeds = max(len(e["seeds"]) for e in block["shuffled"]["all"].values())
        names = _learners(block)
        w = max(len(n) for n in names) + 1
        print(f"\n{TITLES[ds]}")
        for key, what in (("mean_acc", "accuracy"), ("mean_f1", "macro-F1")):
            print(f"mean {what} over batches (%): shuffled, mean ± sd over {n_seeds} seed(s) | file order")
            head = " ".join(f"{r:>12}" for r in REGIMES) + " | " + " ".join(f"{r:>6}" for r in REGIMES)
            extra = "   samples/s" if key == "mean_acc" else ""
            print(f"{'learner':<{w}} {head}{extra}")
            for n in names:
                sh = " ".join(f"{_cell(block['shuffled'][r].get(n), key, True):>12}" for r in REGIMES)
                fo = " ".join(f"{_cell(block['file'][r].get(n), key, False):>6}" for r in REGIMES)
                if key == "mean_acc":
                    sps = [block["shuffled"][r][n]["samples_per_s"] for r in REGIMES if n in block["shuffled"][r]]
                    extra = f"   {sps[-1]:>9.0f}"
                print(f"{n:<{w}} {sh} | {fo}{extra}")
        print("worst batch vs frozen (acc - frozen acc, percentage points; min over batches and seeds)")
        print(f"{'learner':<{w}} " + " ".join(f"{'sh ' + r:>9}" for r in REGIMES) + " | "
              + " ".join(f"{'file ' + r:>10}" for r in REGIMES))
        for n in names:
            cells = []
            for order, width in (("shuffled", 9), ("file", 10)):
                cells.append(" ".join(
                    f"{block[order][r][n]['worst_vs_frozen']:>+{width}.1f}" if n in block[order][r]
                    else f"{'—':>{width}}" for r in REGIMES))
            print(f"{n:<{w}} {cells[0]} | {cells[1]}")
    cos = result.get("cosine")
    if cos:
        print(f"\nFF update vs -grad of CE + lambda*L_meta (BP), cosine; gas, shuffled, all labels, seed {cos['seed']}")
        print(f"{'layer':<22} {'per sample':>10} {'sum of ' + str(cos['window']):>10} {'per batch':>10}  FF is")
        for c in cos["layers"]:
            def f(v):
                return f"{v:>10.2f}" if v is not None else f"{'—':>10}"
            name = f"{c['layer']} {c['kind']} {c['shape'][1]}->{c['shape'][0]}"
            print(f"{name:<22} {f(c['mean_per_sample'])} {f(c['mean_window_sum'])} {f(c['mean_batch_sum'])}  {c['ff']}")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASETS if result.get(d)]
    fig, axes = plt.subplots(len(datasets), len(REGIMES), figsize=(5 * len(REGIMES), 3.8 * len(datasets)),
                             squeeze=False)
    colors = {n: plt.get_cmap("tab10")(k % 10) for k, n in enumerate(LEARNERS)}
    for row, ds in zip(axes, datasets):
        block = result[ds]["shuffled"]
        for ax, regime in zip(row, REGIMES):
            for name, entry in block[regime].items():
                acc = [b["acc"] for b in entry["per_batch"]]
                style = "-" if name.startswith("edge-spl") or name == "frozen" else "--"
                ax.plot(range(len(acc)), acc, style, marker="o", ms=3, color=colors[name],
                        lw=2.2 if name == "edge-spl" else 1.2, label=f"{name} ({entry['mean_acc']:.1f})")
            batches = [b["batch"] for b in next(iter(block[regime].values()))["per_batch"]]
            ax.set_xticks(range(len(batches)))
            ax.set_xticklabels(batches, fontsize=8)
            ax.set_title(f"{ds}, labels: {regime}", fontsize=10)
            ax.set_ylabel("accuracy per batch (%)")
            ax.set_ylim(0, 101)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("edge-spl bench adapt: prequential accuracy along the stream (shuffled order, mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
