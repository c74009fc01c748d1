"""`edge-spl train`: pretrain an SPL model and save it to MODEL_DIR (model.npz + model.json)."""
from __future__ import annotations

import os

from edge_spl.data import Dataset, brief, columns, load_training_data
from edge_spl.errors import DataError, ModelError
from edge_spl.manifest import remove_export


def parse_hidden(text: str) -> list[int]:
    try:
        widths = [int(t) for t in text.split(",")]
    except ValueError:
        widths = []
    if not widths or any(w < 1 for w in widths):
        raise ModelError(f"--hidden {text!r}: expected comma-separated positive layer widths, e.g. 256,256")
    return widths


def parse_features(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise DataError(f"--features {text!r}: expected comma-separated column names")
    return names


def run(args) -> int:
    hidden = parse_hidden(args.hidden)
    if not 0.0 <= args.holdout < 1.0:
        raise DataError(f"--holdout {args.holdout}: expected a fraction in [0, 1), e.g. 0.2")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ModelError(f"--out {args.out}: is a file, expected a folder for the model")
    dataset = load_training_data(args.data, args.label, parse_features(args.features))
    print(describe(dataset))

    from edge_spl.export.pretrain import pretrain
    from edge_spl.spl import WHITEN_SHRINK

    state, report = pretrain(dataset, hidden=hidden, epochs=args.epochs, holdout=args.holdout,
                             seed=args.seed, progress=not args.quiet,
                             whiten=None if args.no_whiten else WHITEN_SHRINK)
    try:
        stale = remove_export(args.out)
        state.save(args.out)
    except OSError as e:
        raise ModelError(f"--out {args.out}: cannot write the model ({e.strerror})") from None
    if stale:
        print(f"removed the export of the model this replaces ({', '.join(stale)}): run "
              f"`edge-spl export {args.out}` again")

    if report["heldout_acc"] is None:
        acc = f"training accuracy {report['train_acc']:.3f} ({report['n_train']} samples, none held out)"
    else:
        acc = f"held-out accuracy {report['heldout_acc']:.3f} ({report['n_heldout']} samples)"
    if report["whiten_note"]:
        print(report["whiten_note"])
    active = " / ".join(f"{a:.0%}" for a in report["active"])
    print(f"{acc}, active units {active}, {report['seconds']:.1f} s, saved {args.out}")
    return 0


def describe(dataset: Dataset) -> str:
    """What train will learn from: the features (a column left out is visible here), the classes,
    and a warning when the label column looks like a measurement rather than a class."""
    classes = dataset.classes()
    labelled = sum(v is not None for v in dataset.y)
    line = (f"{labelled} labelled rows, features {columns(dataset.feature_names)}; "
            f"{len(classes)} classes {brief(classes, show=4)}")
    if len(classes) > 20 and labelled < 10 * len(classes):
        line += (f"\nwarning: {len(classes)} classes with {labelled / len(classes):.1f} rows each on average: "
                 f"is the label column a measurement? Each distinct value is a class")
    return line

