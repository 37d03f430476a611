"""Evaluate saved scores: mAP, eAP, top-k and thresholded CP/CR/CF1/OP/OR/OF1, per class.

CPU only (numpy + scikit-learn); the same command on any machine:

    python -m mlic_dist.evaluate --scores S.npy --targets T.npy [--classes names.json] \
        [--top-k 3] [--threshold 0.5 | --thresholds thresholds.json] [--format table|json]
    python -m mlic_dist.evaluate --run-dir runs/NAME [--split test] [--format json]

A run directory (written by `mlic_dist.train`) holds scores_{split}.npy (N, C) probabilities,
targets_{split}.npy (N, C) int8 in {1, 0, -1}, keys_{split}.txt, classes.json and, when tuned,
thresholds.json ({class name: threshold}); the `thresh` rule uses that file when present, else
0.5, unless --threshold / --thresholds is given. Definitions: see `mlic_dist.metrics`. Values are
fractions in the JSON and percentages in the table. Bad input exits with code 2 and one line on
stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import metrics, rundir
from .cli import entry_point
from .errors import UserError


class EvaluateError(UserError, ValueError):
    """An input file of `evaluate` is missing or not what it should hold."""


def load_array(path: Path, what: str) -> np.ndarray:
    """np.load without pickles; errors name the file and what it should hold."""
    if not Path(path).is_file():
        raise EvaluateError(f"{what} file {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise EvaluateError(f"{what} file {path} is not a readable .npy array: {err}") from None


def load_classes(path: Path) -> list[str]:
    """A JSON list of class names."""
    if not Path(path).is_file():
        raise EvaluateError(f"classes file {path} does not exist")
    try:
        names = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvaluateError(f"classes file {path} is not valid JSON: {err}") from None
    except OSError as err:
        raise EvaluateError(f"classes file {path} cannot be read: {err.strerror or err}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise EvaluateError(f"classes file {path} must hold a JSON list of class names (strings)")
    return names


def _pct(value: Optional[float]) -> str:
    return "   n/a" if value is None else f"{100 * value:6.2f}"


def format_table(result: dict) -> str:
    """A readable aligned text table (percentages): summary rows, then one row per class."""
    topk = next(key for key in result if key.startswith("top"))
    setting = result["settings"]["threshold"]
    rule = "per-class thresholds" if setting == "per-class" else f"score >= {setting:g}"
    lines = [
        f"images {result['num_samples']}  classes {result['num_classes']}  "
        f"mAP {_pct(result['mAP']).strip()} (chance {_pct(result.get('chance_mAP')).strip()})  "
        f"eAP {_pct(result['eAP']).strip()}",
        "",
        f"{'rule':<28}" + "".join(f"{key:>9}" for key in metrics.SUMMARY_KEYS),
    ]
    for key, label in ((topk, f"{topk} (no threshold)"), ("thresh", f"thresh ({rule})")):
        lines.append(f"{label:<28}" + "".join(f"{_pct(result[key][m]):>9}"
                                              for m in metrics.SUMMARY_KEYS))
    width = max([len("class")] + [len(row["name"]) for row in result["per_class"]])
    lines += ["", f"{'class':<{width}}  {'AP':>6}  {'P':>6}  {'R':>6}  {'F1':>6}  "
                  f"{'thresh':>8}  {'pos':>7}  {'ignored':>7}"]
    for row in result["per_class"]:
        lines.append(f"{row['name']:<{width}}  {_pct(row['AP'])}  {_pct(row['P'])}  "
                     f"{_pct(row['R'])}  {_pct(row['F1'])}  {row['threshold']:8.4f}  "
                     f"{row['num_positives']:>7}  {row['num_ignored']:>7}")
    if result["classes_without_positives"]:
        lines += ["", "classes without positives (left out of mAP, CP, CR, CF1): "
                  + ", ".join(result["classes_without_positives"])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Loads what the arguments name and returns `metrics.evaluate`'s dict."""
    if args.run_dir is not None:
        run = rundir.load_run(args.run_dir, splits=[args.split])
        split = run.split(args.split)
        scores, targets, classes = split.scores, split.targets, run.classes
        thresholds = run.thresholds if args.threshold is None else None
    else:
        scores = load_array(args.scores, "scores")
        targets = load_array(args.targets, "targets")
        classes = load_classes(args.classes) if args.classes else None
        thresholds = None
    scores, targets = metrics.validate(scores, targets)  # before names meet columns
    if args.thresholds is not None:
        names = classes or [f"class_{i}" for i in range(scores.shape[1])]
        if not args.thresholds.is_file():
            raise EvaluateError(f"thresholds file {args.thresholds} does not exist")
        thresholds = metrics.load_thresholds(args.thresholds, names)
    threshold = 0.5 if args.threshold is None else args.threshold
    return metrics.evaluate(scores, targets, classes, k=args.top_k, threshold=threshold,
                            thresholds=thresholds, topk_ignore=args.topk_ignore)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlic_dist.evaluate",
        description="Multi-label metrics of saved (N, C) scores; definitions in mlic_dist.metrics.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scores", type=Path, help="(N, C) .npy scores (probabilities)")
    source.add_argument("--run-dir", type=Path, help="a training run's output directory")
    parser.add_argument("--targets", type=Path, help="(N, C) .npy targets in {1, 0, -1 ignore}")
    parser.add_argument("--classes", type=Path, help="JSON list of class names (default class_i)")
    parser.add_argument("--split", default="test", help="with --run-dir: which split (default test)")
    parser.add_argument("--top-k", type=int, default=3, help="predictions per image for top-k")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float, help="global threshold (default 0.5)")
    rule.add_argument("--thresholds", type=Path, help="JSON {class name: threshold}")
    parser.add_argument("--topk-ignore", choices=metrics.TOPK_IGNORE_MODES, default="exclude",
                        help="ignore entries out of the top-k ranking (exclude) or taking a "
                             "slot as in the seed repo's prf_cal (slot)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    return parser


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.scores is not None and args.targets is None:
        parser.error("--scores needs --targets")
    if args.run_dir is not None and (args.targets is not None or args.classes is not None):
        parser.error("--run-dir reads targets and classes from the run; drop --targets/--classes")
    result = run(args)
    print(json.dumps(result, indent=2) if args.format == "json" else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
