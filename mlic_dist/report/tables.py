"""The paper's tables and plots for an experiment's runs and ensembles, in Markdown, CSV and PNG.

CPU only, headless (matplotlib's Agg canvas):

    python -m mlic_dist.report --experiment mlic [--out reports/mlic] [--tracking-uri URI] [--parent-run-id ID]
    python -m mlic_dist.report --run-dirs runs/a runs/b runs/ensembles/scale-... [--out DIR]   # no MLflow
Python (the sweep): `build_report("mlic", uri, Path("reports/mlic"), parent_run_id)` -> Report.

Writes into --out (default reports/NAME): report.md; single_models.csv (the paper's Table 2
layout: backbone, augmentation, size -> mAP, chance mAP (the expected mAP of random scores on the
split's labels, metrics.chance_mean_average_precision) and top-3 L-P L-R L-F1 O-P O-R O-F1, then the same
with the per-class thresholds tuned on validation); ensembles.csv (Table 3: the best single model
chosen on validation vs every ScaleEn / DistrEn / greedy ensemble, val and test mAP, chance mAP, and whether
each beats it on test); calibration_summary.csv and calibration-RUN.csv (the AdvancedCNN paper's
tables: per class the tuned threshold, its validation F1, and test F1 with it and at 0.5);
per_class_ap.png, pr_curves.png, training_curves.png, ensemble_members.png. Several seeds of one
configuration are one row, mean +- std (n). Values are percentages of the test split (val when a
run has no test split). L-F1 is the MEAN of per-class F1 (`CF1_mean`), as in the paper, where it
lies below the harmonic mean of L-P and L-R; O-F1 is the harmonic mean of O-P and O-R. CSV
columns carry the MLflow metric names (e.g. test_top3_CF1_mean).

With --experiment the report is also logged to MLflow as its own run in the experiment
(tag mlic.kind=report, nested under --parent-run-id when given: a sweep's report sits beside its
trials), the files as its artifacts; rebuilding updates that run. It prints the ensemble table
(the single-model table when there is no ensemble). User errors exit 2 with one line.
"""
from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .. import metrics, rundir
from ..atomic import check_dir, replace_with
from ..ensemble.selection import model_config
from ..errors import UserError
from ..tracking import derived, query as mq
from ..tracking.store import resolve_uri
from . import plots

RULE_COLUMNS = (("L-P", "CP"), ("L-R", "CR"), ("L-F1", "CF1_mean"), ("O-P", "OP"), ("O-R", "OR"), ("O-F1", "OF1"))
ENSEMBLE_TITLES = {"scale": "ScaleEn", "distr": "DistrEn", "greedy": "Greedy selection", "manual": "Manual",
                   "tta": "TTA", "soup": "Weight soup", "distill": "Distilled student"}
LEGEND = ("chance mAP: the expected mAP of random scores on the same labels (exact, per class "
          "over the non-ignored rows, averaged as mAP is), the floor to read mAP against. Top-3 columns (the paper's tables): each image predicts its 3 highest-scoring classes, no "
          "threshold. L-P / L-R: mean over classes of per-class (label-centric) precision / recall. "
          "**L-F1: mean over classes of per-class F1** (`CF1_mean`; below the harmonic mean of L-P "
          "and L-R). O-P / O-R: overall precision / recall over all (image, class) pairs; O-F1: "
          "their harmonic mean. `thr` columns: the same with the run's per-class thresholds tuned "
          "on validation. Percent; mean ± std (n) over seeds where a configuration has several.")


class ReportError(UserError, ValueError):
    """Nothing to report, or a source the user named is unusable; the message says which."""


Entry = mq.FinishedRun   # a report's row source: a finished training run or ensemble
DERIVED_KINDS = ("soup", "distill")   # metrics.json "kind" of a single model made from other runs


def value(e: Entry, split: str, rule: Optional[str] = None, key: str = "mAP") -> float:
    """A metric of the run's `split` from metrics.json (NaN when it has none): mAP, or `key`
    under a rule (top3 / thresh / ...; "top" = the top-k rule it has)."""
    r = e.run.metrics.get(split, {})
    v = r.get(key) if rule is None else r.get(_rule_key(r, rule), {}).get(key)
    return float("nan") if v is None else float(v)


@dataclass
class Report:
    markdown: str
    paths: list[Path]
    tables: dict = field(default_factory=dict)      # name -> list of row dicts (CSV content)
    run_id: Optional[str] = None                    # the MLflow report run


def _rule_key(result: dict, rule: str) -> str:
    return next((k for k in result if k.startswith("top")), "top3") if rule == "top" else rule


# --------------------------------------------------------------------------- sources


def collect_from_dirs(dirs: Sequence[Path]) -> list[Entry]:
    return [mq.finished_run(d) for d in dirs]


def collect_from_mlflow(experiment: str, tracking_uri: Optional[str], parent_run_id: Optional[str] = None) -> list[Entry]:
    """Finished training runs and ensembles of `experiment` (nested under `parent_run_id` when
    given) whose directories are on this machine; a directory logged twice counts once (newest)."""
    client = mq.connect(tracking_uri)
    runs = mq.finished_runs(client, experiment, parent_run_id, kinds=(mq.SINGLE, "ensemble"))
    entries = []
    for r in mq.runs_by_dir(runs).values():
        try:
            entries.append(mq.finished_run(mq.run_dir_of(r), r))
        except (mq.TrackingQueryError, rundir.RunDirError) as e:
            warnings.warn(f"report: skipping MLflow run {r.run_id} ({r.name}): {e}")
    return sorted(entries, key=lambda e: e.start_time)


# --------------------------------------------------------------------------- statistics


@dataclass
class Stat:
    values: list

    @property
    def mean(self) -> float:
        v = [x for x in self.values if x == x]
        return float(np.mean(v)) if v else float("nan")

    @property
    def std(self) -> float:
        v = [x for x in self.values if x == x]
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    def text(self, scale: float = 100.0) -> str:
        if self.mean != self.mean:
            return "n/a"
        if len(self.values) == 1:
            return f"{scale * self.mean:.2f}"
        return f"{scale * self.mean:.2f} ± {scale * self.std:.2f} ({len(self.values)})"


def _split_of(entries: Sequence[Entry]) -> str:
    return "test" if entries and all("test" in e.run.metrics for e in entries) else "val"


def _metric_columns(split: str) -> list[tuple[str, str, Optional[str], str]]:
    """(markdown label, CSV / MLflow name, rule, key) of the Table 2 columns."""
    prefix = "final_val" if split == "val" else split
    cols = [("mAP", f"{prefix}_mAP", None, "mAP"), ("chance mAP", f"{prefix}_chance_mAP", None, "chance_mAP")]
    cols += [(label, f"{prefix}_top3_{key}", "top", key) for label, key in RULE_COLUMNS]
    cols += [(f"thr {label}", f"{prefix}_thresh_{key}", "thresh", key) for label, key in RULE_COLUMNS]
    return cols


# --------------------------------------------------------------------------- tables


def single_groups(entries: Sequence[Entry]) -> dict[str, list[Entry]]:
    """Training runs by configuration (every model-defining key but the seed). A model made from
    other runs (metrics.json kind soup / distill) is not a training configuration: its config is
    its best ingredient's or its student's recipe, so it is left out of these groups."""
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        if not e.is_ensemble and e.run.metrics.get("kind") not in DERIVED_KINDS:
            cfg = {k: v for k, v in model_config(e.flat_config).items() if k != "seed"}
            groups.setdefault(json.dumps(cfg, sort_keys=True, default=str), []).append(e)
    return groups


def single_model_table(entries: Sequence[Entry], split: str) -> list[dict]:
    groups = single_groups(entries)
    shown = ("model.backbone", "data.augment", "data.size")
    cfgs = {k: json.loads(k) for k in groups}
    varying = sorted({key for c in cfgs.values() for key in c if key not in shown
                      and len({json.dumps(o.get(key)) for o in cfgs.values()}) > 1})
    rows = []
    for key, members in groups.items():
        c = cfgs[key]
        row = {"backbone": c.get("model.backbone"), "augment": c.get("data.augment"), "size": c.get("data.size")}
        if varying:
            row["other"] = ", ".join(f"{k}={c.get(k)}" for k in varying)
        row["runs"] = ", ".join(m.name for m in members)
        row["n"] = len(members)
        row["val mAP"] = Stat([value(m, "val") for m in members])
        for label, _, rule, k in _metric_columns(split):
            row[label] = Stat([value(m, split, rule, k) for m in members])
        rows.append(row)
    return sorted(rows, key=lambda r: (str(r["backbone"]), str(r["augment"]), int(r["size"] or 0), r.get("other", "")))


def _ensemble_group(e: Entry) -> tuple[str, str]:
    doc = e.run.ensemble
    kind = doc.get("kind", "manual")
    if kind in ("scale", "distr") and "group" in doc:
        cfg = {k: v for k, v in doc["group"]["config"].items() if k != "seed"}
        shown = cfg.get("data.augment") if kind == "scale" else f"{cfg.get('data.size')} px"
        values = doc["group"].get("values")   # the members' sizes / augmentations (older files: absent)
        if values:
            shown += (f": {'/'.join(map(str, values))} px" if kind == "scale" else f": {' + '.join(map(str, values))}")
        key = (kind, json.dumps(cfg, sort_keys=True), json.dumps(values, default=str))
        return key, f"{ENSEMBLE_TITLES[kind]} ({cfg.get('model.backbone')}, {shown})"
    return (kind, e.name), f"{ENSEMBLE_TITLES.get(kind, kind)}: {e.name}"


def _ensemble_row(members: Sequence[Entry]) -> bool:
    return bool(members) and members[0].is_ensemble


def best_single_key(groups: dict[str, list[Entry]]) -> str:
    """The configuration with the best mean validation mAP over its seeds (never test)."""
    return max(groups, key=lambda k: np.nan_to_num(Stat([value(m, "val") for m in groups[k]]).mean, nan=-1))


def ensemble_table(entries: Sequence[Entry], split: str) -> list[dict]:
    """The best single configuration chosen on validation (when there are training runs), then
    every ensemble group, with its difference to that single best on `split`."""
    groups = single_groups(entries)
    rows = []
    if groups:
        best_key = best_single_key(groups)
        cfg = json.loads(best_key)
        rows.append((f"Single best (val): {cfg.get('model.backbone')} {cfg.get('data.augment')} "
                     f"{cfg.get('data.size')} px", groups[best_key], 1))
    ens: dict = {}
    for e in entries:
        if e.is_ensemble:
            key, label = _ensemble_group(e)
            ens.setdefault(key, (label, []))[1].append(e)
    for label, members in ens.values():
        rows.append((label, members, len(members[0].run.ensemble.get("members", []))))
    base = Stat([value(m, split) for m in rows[0][1]]).mean if groups else float("nan")
    table = []
    for i, (label, members, size) in enumerate(rows):
        test = Stat([value(m, split) for m in members])
        row = {"method": label, "runs": ", ".join(m.name for m in members), "members": size,
               "member runs": "; ".join(", ".join(x.get("name") or Path(x["run_dir"]).name
                                                  for x in m.run.ensemble.get("members", []))
                                        for m in members) if _ensemble_row(members) else "",
               "n": len(members),
               "val mAP": Stat([value(m, "val") for m in members]), f"{split} mAP": test,
               "chance mAP": Stat([value(m, split, key="chance_mAP") for m in members]),
               f"Δ {split} mAP": Stat([v - base for v in test.values])}
        row["beats single best"] = "" if not groups or i == 0 else ("yes" if test.mean > base else "no")
        for label2, _, rule, k in _metric_columns(split)[2:2 + len(RULE_COLUMNS)]:
            row[label2] = Stat([value(m, split, rule, k) for m in members])
        table.append(row)
    return table


FUSED = ("scale", "distr", "greedy", "manual")   # ensembles that fuse several trained runs


def _model_kind(e: Entry) -> str:
    if e.is_ensemble:
        return e.run.ensemble.get("kind", "manual")
    return e.run.metrics.get("kind") or "single"


def forward_passes(e: Entry) -> int:
    """Network forward passes per image at inference (metrics.json; older directories: a run 1,
    an ensemble one per member)."""
    recorded = e.run.metrics.get("forward_passes")
    if recorded is not None:
        return int(recorded)
    return len(e.run.ensemble.get("members", [])) if e.is_ensemble else 1


def one_model_entries(entries: Sequence[Entry]) -> list[Entry]:
    """The one-model table's rows: the best single training run (configuration, then seed, on
    validation), then every ensemble, TTA, soup and student; [] without a single run or another."""
    groups = single_groups(entries)
    best_single = _best(groups[best_single_key(groups)]) if groups else None
    others = [e for e in entries if e.is_ensemble or _model_kind(e) in DERIVED_KINDS]
    if best_single is None or not others:
        return []
    order = {k: i for i, k in enumerate(("single", *FUSED, "tta", "soup", "distill"))}
    return [best_single] + sorted(others, key=lambda e: (order.get(_model_kind(e), 99), e.name))


def one_model_table(entries: Sequence[Entry], split: str, speeds: Optional[dict] = None) -> list[dict]:
    """The ensemble's accuracy at one model's cost: the best single training run (its
    configuration chosen on validation, then its best seed on validation), every ensemble
    (ScaleEn, DistrEn, greedy, manual, TTA), weight soup and distilled student, one row each, with
    val and test mAP, forward passes per image, `speeds` {run dir: predict images/s} where
    measured, and the share of the gain kept: (mAP - best single's) / (the reference ensemble's -
    best single's) on `split`, the reference being the fused ensemble with the best validation
    mAP. Every choice is on validation; `split` is only read."""
    rows = one_model_entries(entries)
    if not rows:
        return []
    best_single, others = rows[0], rows[1:]
    fused = [e for e in others if _model_kind(e) in FUSED]
    reference = _best(fused)
    base = value(best_single, split)
    gain = value(reference, split) - base if reference is not None else float("nan")
    table = []
    for e in rows:
        kind = _model_kind(e)
        test = value(e, split)
        row = {"model": ("Single best (val): " if e is best_single else "") + e.name,
               "kind": ENSEMBLE_TITLES.get(kind, kind) if kind != "single" else "single",
               "forward passes": forward_passes(e), "val mAP": value(e, "val"), f"{split} mAP": test,
               f"Δ {split} mAP": test - base,
               "gain kept": "" if e is best_single or not gain > 0 else f"{(test - base) / gain:.0%}",
               "images/s": "" if not speeds or e.run.path.resolve() not in speeds
               else f"{speeds[e.run.path.resolve()]:.1f}"}
        if e is reference:
            row["gain kept"] = "100% (reference)"
        table.append(row)
    return table


def calibration_table(e: Entry) -> tuple[list[dict], dict]:
    """Per class: tuned threshold, its validation F1, test F1 with it and at a global 0.5 (the
    AdvancedCNN paper's Tables 1-2), and a summary row (macro F1 and O-F1, both rules)."""
    split = "test" if "test" in e.run.splits else "val"
    s = e.run.split(split)
    at_half = metrics.evaluate(s.scores, s.targets, e.run.classes, threshold=0.5)
    tuned = e.run.metrics.get(split) or metrics.evaluate(s.scores, s.targets, e.run.classes,
                                                         thresholds=e.run.thresholds)
    val = e.run.metrics.get("val", {}).get("per_class", [])
    rows = []
    for c, name in enumerate(e.run.classes):
        f_tuned, f_half = tuned["per_class"][c]["F1"], at_half["per_class"][c]["F1"]
        rows.append({"class": name, "threshold": e.run.thresholds[c] if e.run.thresholds is not None else 0.5,
                     "val F1": val[c]["F1"] if c < len(val) else None, f"{split} F1 (tuned)": f_tuned,
                     f"{split} F1 (0.5)": f_half,
                     "gain": None if f_tuned is None or f_half is None else f_tuned - f_half})
    summary = {"run": e.name, "split": split, "macro F1 (0.5)": at_half["thresh"]["CF1_mean"],
               "macro F1 (tuned)": tuned["thresh"]["CF1_mean"], "O-F1 (0.5)": at_half["thresh"]["OF1"],
               "O-F1 (tuned)": tuned["thresh"]["OF1"]}
    summary["macro F1 gain"] = _diff(summary["macro F1 (tuned)"], summary["macro F1 (0.5)"])
    summary["O-F1 gain"] = _diff(summary["O-F1 (tuned)"], summary["O-F1 (0.5)"])
    return rows, summary


def _diff(a, b):
    return None if a is None or b is None else a - b


# --------------------------------------------------------------------------- formatting


def _cell(v, pct: bool = True) -> str:
    if isinstance(v, Stat):
        return v.text(100.0 if pct else 1.0)
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    if isinstance(v, float):
        return f"{100 * v:.2f}" if pct else f"{v:.3f}"
    return str(v)


def markdown_table(rows: Sequence[dict], pct: bool = True) -> str:
    if not rows:
        return "(none)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c), pct) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[dict], names: Optional[dict] = None) -> Path:
    """Stat cells become NAME (mean) and NAME_std; `names` maps a column to its CSV name."""
    names = names or {}
    flat_rows = []
    for r in rows:
        out = {}
        for k, v in r.items():
            n = names.get(k, k)
            if isinstance(v, Stat):
                out[n], out[f"{n}_std"] = v.mean, v.std
            else:
                out[n] = v
        flat_rows.append(out)
    cols = list(flat_rows[0]) if flat_rows else []
    with replace_with(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(flat_rows)
    return path


# --------------------------------------------------------------------------- the report


def _best(entries: Sequence[Entry]) -> Optional[Entry]:
    return max(entries, key=lambda e: np.nan_to_num(value(e, "val"), nan=-1.0), default=None)


def _member_values(e: Entry, split: str, by_dir: dict) -> list[tuple[str, float]]:
    out = []
    for m in e.run.ensemble.get("members", []):
        d = Path(m["run_dir"]).resolve()
        try:
            member = by_dir.get(d) or mq.finished_run(d)
        except rundir.RunDirError:
            continue
        out.append((member.name if d in by_dir else m.get("name") or member.name, value(member, split)))
    return out


def write_report(entries: Sequence[Entry], out: Path, title: str, speed_images: int = 0,
                 device: str = "cpu") -> Report:
    """Tables, calibration and plots of `entries` into `out`; returns the Report. With
    `speed_images` > 0, the one-model table's rows get predict's images/s on this machine
    (report/speed.py: that many validation images each)."""

    if not entries:
        raise ReportError(f"nothing to report for {title}: no finished run or ensemble with its "
                          f"directory on this machine")
    out.mkdir(parents=True, exist_ok=True)
    split = _split_of(entries)
    singles = [e for e in entries if not e.is_ensemble]
    ensembles = [e for e in entries if e.is_ensemble]
    single_rows = single_model_table(entries, split)
    ens_rows = ensemble_table(entries, split)
    one_rows = one_model_table(entries, split)
    if one_rows and speed_images > 0:
        from .speed import predict_images_per_s   # runs the models: torch

        speeds = {}
        for e in one_model_entries(entries):
            try:
                speeds[e.run.path.resolve()] = predict_images_per_s(e.run.path, speed_images, device=device)
            except (UserError, ValueError, OSError) as err:    # shards moved, weights missing: that cell only
                warnings.warn(f"report: predict's images/s of {e.name} not measured ({str(err)[:300]})")
        one_rows = one_model_table(entries, split, speeds)
    names = {label: name for label, name, _, _ in _metric_columns(split)}
    names.update({"val mAP": "final_val_mAP", f"{split} mAP": names["mAP"], f"Δ {split} mAP": f"delta_{names['mAP']}",
                  "beats single best": "beats_single_best"})
    paths = [write_csv(out / "single_models.csv", single_rows, names),
             write_csv(out / "ensembles.csv", ens_rows, names)]
    if one_rows:
        paths.append(write_csv(out / "one_model.csv", one_rows, names))
    cal_summary, cal_md = [], []
    groups = single_groups(entries)
    best_single = _best(groups[best_single_key(groups)]) if groups else None   # the table's choice
    best_ens = _best(ensembles)
    used: set[str] = set()
    for e in entries:
        rows, summary = calibration_table(e)
        cal_summary.append(summary)
        stem = e.name if e.name not in used else f"{e.name}-{len(used)}"   # two runs, one name
        used.add(stem)
        paths.append(write_csv(out / f"calibration-{stem}.csv", rows))
        if e in (best_single, best_ens):
            cal_md.append(f"#### {e.name}\n\n" + markdown_table(rows, pct=False))
    paths.append(write_csv(out / "calibration_summary.csv", cal_summary))
    by_dir = {e.run.path.resolve(): e for e in entries}
    paths += [p for p in (
        plots.per_class_ap(out / "per_class_ap.png", best_single, best_ens, split),
        plots.pr_curves(out / "pr_curves.png", [e for e in (best_single, best_ens) if e], split),
        plots.training_curves(out / "training_curves.png", singles),
        plots.ensemble_members(out / "ensemble_members.png",
                               [(e.name, value(e, split), _member_values(e, split, by_dir)) for e in ensembles], split),
    ) if p is not None]
    md = [f"# {title}", "",
          f"{len(singles)} training runs, {len(ensembles)} ensembles; metrics on the **{split}** split "
          f"(selection and thresholds on validation only).", "",
          "## Ensembles vs the best single model (chosen on validation)", "",
          markdown_table(ens_rows), "",
          *(["## The ensemble at one model's cost", "",
             f"Forward passes per image at inference, and `predict`'s images/s on this machine"
             f"{f' ({speed_images} validation images, {device})' if speed_images > 0 else ' (not measured: --speed-images N)'}. "
             f"Gain kept: the share of the reference ensemble's {split} gain over the best single model "
             f"(the reference: the fused ensemble with the best validation mAP).", "",
             markdown_table(one_rows), ""] if one_rows else []),
          "## Single models (the paper's Table 2 layout)", "", markdown_table(single_rows), "", LEGEND, "",
          "## Per-class threshold calibration (the AdvancedCNN paper's tables)", "",
          f"F1 on {split} with the per-class thresholds tuned on validation vs a global 0.5 "
          f"(fractions; gain = tuned - 0.5). Per-class tables of every run: calibration-RUN.csv.", "",
          markdown_table(cal_summary, pct=False), "", *cal_md,
          "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in paths if p.suffix == ".png"]
    text = "\n".join(md) + "\n"
    paths.insert(0, rundir.write_text(out, "report.md", text))
    tables = {"single_models": single_rows, "ensembles": ens_rows, "one_model": one_rows,
              "calibration_summary": cal_summary}
    return Report(text, paths, tables)


def _log(report: Report, out: Path, experiment: str, tracking_uri: Optional[str], parent_run_id: Optional[str],
         num_entries: int) -> Optional[str]:
    """The report as its own MLflow run (tag mlic.kind=report) in the experiment, nested under
    the parent when given; a rebuild in the same store re-opens the previous report run."""
    uri = resolve_uri(tracking_uri)
    return derived.log_derived(out, uri=uri, experiment=experiment, run_name=f"report-{experiment}", kind="report",
                               params={"report.entries": num_entries}, tags={mq.NOTE_TAG: report.markdown[:5000]},
                               artifacts=report.paths, parent_run_id=parent_run_id,
                               previous=derived.previous_run(out, uri, experiment, "report"))


def build_report(experiment: str, tracking_uri: Optional[str], out_dir: Path,
                 parent_run_id: Optional[str] = None, speed_images: int = 0, device: str = "cpu") -> Report:
    """The report of an MLflow experiment (or of the runs nested under `parent_run_id`), written
    to `out_dir` and logged as a report run; returns its Markdown and the paths written."""
    out = check_dir(out_dir, "--out", ReportError)   # before reading MLflow and every run
    entries = collect_from_mlflow(experiment, tracking_uri, parent_run_id)
    report = write_report(entries, out, f"Experiment {experiment}" + (f" (parent run {parent_run_id})"
                                                                        if parent_run_id else ""),
                          speed_images, device)
    report.run_id = _log(report, out, experiment, tracking_uri, parent_run_id, len(entries))
    return report
