"""Screenshots of the MLflow UI in a real (headless) browser: the experiment's runs table and a
comparison of its runs, so a reader can see what a newcomer sees after `make demo`.

    python bench/mlflow_ui.py                                    # sqlite:///mlflow.db, experiment "demo"
    python bench/mlflow_ui.py --store sqlite:///runs/mlflow.db --experiment demo --out bench/results
    python bench/mlflow_ui.py --make-runs /tmp/ui-demo           # first trains 3 tiny runs there
                                                                 # (a parent with 2 nested + 1 alone)

Starts `mlflow server` on 127.0.0.1 over the store (mlic_dist.tracking.server.MlflowServer), opens
  - `#/experiments/<ID>/runs`: the runs table (MLflow 3 otherwise opens an experiment on its GenAI
    overview, traces and latency, which shows nothing of training runs), and
  - `#/compare-runs?runs=[...]&experiments=[...]`: params and metrics of up to 4 runs side by side,
in headless Chromium (Debian's `chromium`: apt-get install chromium), driven over the DevTools
protocol (bench/cdp.py) the way a newcomer would use the page: close the assistant panel, expand
the nested runs under their parent, tick metric and param columns in "Columns" (MLflow 3.17's
table shows none by default). Writes OUT/mlflow-ui-runs.png and OUT/mlflow-ui-compare.png; the
server (its whole process group) and the browser (its group) are stopped on every exit path.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from cdp import BrowserError, find_chromium  # noqa: E402  (bench/cdp.py)

from mlic_dist.errors import UserError  # noqa: E402
from mlic_dist.tracking.server import MlflowServer  # noqa: E402

# Columns ticked in the runs table when the runs have them (the first ones found, in this order).
METRIC_COLUMNS = ["test_mAP", "final_val_mAP", "val_loss", "ensemble_test_mAP"]
PARAM_COLUMNS = ["model.backbone", "data.size", "data.augment"]

# JavaScript: the runs grid (ag-grid) rows and header texts, the assistant panel's close button.
JS_ROWS = "[...document.querySelectorAll('.ag-row')].map(r => r.innerText).join('\\n')"
JS_HEADERS = "[...document.querySelectorAll('.ag-header-cell')].map(h => h.innerText.trim())"
JS_ASSISTANT_CLOSE = ("[...document.querySelectorAll('button[aria-label=Close]')].find(b => "
                      "b.closest('div') && document.body.innerText.includes('MLflow Assistant'))")
JS_EXPANDERS = "[...document.querySelectorAll('.ag-row button[data-component-id*=runnamecellrenderer]')]"


def runs_url(server_uri: str, experiment_id: str) -> str:
    return f"{server_uri}/#/experiments/{experiment_id}/runs"


def compare_url(server_uri: str, experiment_id: str, run_ids: list[str]) -> str:
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
    return f"{server_uri}/#/compare-runs?{query}"


def make_demo_runs(root: Path, experiment: str) -> str:
    """Train 3 tiny real runs on demo scenes into ROOT/mlflow.db: a parent run ("grid") with two
    nested children (tag mlflow.parentRunId, set by tracking.parent_run_id) and one run alone.
    Returns the store URI. About a minute on 2 CPU cores."""
    from mlflow.tracking import MlflowClient

    from mlic_dist.config import load_config
    from mlic_dist.demo.scenes import build_scenes
    from mlic_dist.shard import shard
    from mlic_dist.train.loop import train

    root.mkdir(parents=True, exist_ok=True)
    shards = root / "shards"
    if not (shards / "manifest.json").is_file():
        csv_path = build_scenes(root / "scenes", n_train=64, n_val=32, n_test=32, seed=0)
        shard("csv", csv_path, shards, images=root / "scenes", progress=False, verbose=False)
    store = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    with MlflowServer(store, artifacts=root / "mlartifacts") as server:
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        parent = client.create_run(exp_id, run_name="grid-tiny", tags={"sweep": "tiny"})
        base = [f"data.shards={shards}", "data.size=32", "data.loader=torch", "data.batch_size_per_gpu=16",
                "model.backbone=tiny_cnn", "model.pretrained=none", "train.epochs=2",
                "train.mixed_precision=no", f"tracking.uri={server.uri}", f"tracking.experiment={experiment}"]
        for name, extra in (("tiny-M1", ["data.augment=M1", f"tracking.parent_run_id={parent.info.run_id}"]),
                            ("tiny-M2", ["data.augment=M2", f"tracking.parent_run_id={parent.info.run_id}"]),
                            ("tiny-alone", ["data.augment=M2", "optim.lr=0.05"])):
            train(load_config(ROOT / "configs/recipes/wang.yaml",
                              [*base, *extra, f"train.output_dir={root / 'runs' / name}"]))
        client.set_terminated(parent.info.run_id)
    return store


def show_runs_table(browser, url: str, run_names: list[str], columns: list[str]) -> list[str]:
    """Open the runs table, close the assistant, expand nested runs, tick `columns`; returns the
    table's header texts."""
    browser.navigate(url)
    browser.wait_for(f"{JS_ROWS}.includes({json.dumps(run_names[0])})", timeout_s=120, what="the runs table")
    if browser.evaluate(f"!!({JS_ASSISTANT_CLOSE})"):
        browser.click(JS_ASSISTANT_CLOSE, what="the assistant's close button")
    shown = f"{json.dumps(run_names)}.filter(n => {JS_ROWS}.includes(n)).length"
    for i in range(browser.evaluate(f"{JS_EXPANDERS}.length")):   # parents start collapsed
        before = browser.evaluate(shown)
        browser.click(f"{JS_EXPANDERS}[{i}]", what=f"parent run expander {i}")
        browser.wait_for(f"{shown} > {before}", timeout_s=20, what=f"the runs nested under parent {i}")
    browser.click("[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Columns')",
                  what="the Columns menu")
    search = "document.querySelector('input[placeholder=\"Search columns\"]')"
    for name in columns:
        browser.click(search, what="the column search box")
        browser.evaluate(f"{search}.select()")
        browser.type_text(name)
        # the filtered tree in the menu's dialog; the match is highlighted (<strong>) inside a span
        browser.click(f"[...document.querySelectorAll('[role=dialog] span')].reverse().find("
                      f"e => e.innerText.trim() === {json.dumps(name)})", what=f"column {name} in the Columns menu")
    browser.press("Escape", key_code=27)
    browser.wait_for(f"{json.dumps(columns)}.every(c => {JS_HEADERS}.some(h => h.includes(c)))", timeout_s=20,
                     what=f"the columns {columns} in the table")
    return browser.evaluate(JS_HEADERS)


def capture(store: str, experiment: str, out: Path, size: tuple[int, int]) -> dict:
    """Start the server over `store`, screenshot the runs table and a comparison; stop both."""
    from mlflow.tracking import MlflowClient

    from cdp import Chromium

    with MlflowServer(store) as server, \
            Chromium(size=size, timeout_s=60) as browser:
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = [e.name for e in client.search_experiments()]
            raise UserError(f"experiment {experiment!r} is not in {store} (it has {names}): pass "
                            f"--experiment NAME, or run `make demo` first")
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=50)
        if not runs:
            raise UserError(f"experiment {experiment!r} in {store} has no runs: train one first (make demo)")
        metrics = set().union(*(r.data.metrics for r in runs))
        params = set().union(*(r.data.params for r in runs))
        columns = [m for m in METRIC_COLUMNS if m in metrics][:3] + [p for p in PARAM_COLUMNS if p in params]
        # Nested runs (a sweep's trials, its ensembles and report) show once their parent is
        # expanded: wait for a top-level run first.
        top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        names = list(dict.fromkeys(r.info.run_name for r in [*top, *runs]))
        headers = show_runs_table(browser, runs_url(server.uri, exp.experiment_id), names, columns)
        shots = {"runs": str(browser.screenshot(out / "mlflow-ui-runs.png"))}
        # the four best on test: the best trials and the ensembles that rival them
        compared = sorted((r for r in runs if "test_mAP" in r.data.metrics),
                          key=lambda r: -r.data.metrics["test_mAP"])[:4] or [r for r in runs if r.data.metrics][:4]
        if compared:
            browser.navigate(compare_url(server.uri, exp.experiment_id, [r.info.run_id for r in compared]))
            browser.wait_for(f"document.body.innerText.includes({json.dumps(compared[-1].info.run_name)}) && "
                             f"document.body.innerText.includes('Metrics')", timeout_s=120, what="the comparison")
            browser.wait_for("document.querySelector('.js-plotly-plot .main-svg')", timeout_s=60,
                             what="the comparison's parallel-coordinates plot")
            # one tall capture: plot, run details, parameters and metrics tables
            browser.resize(size[0], max(size[1], 2600))
            browser.wait_for("document.body.innerText.includes('test_mAP') || document.body.innerText.includes('val_mAP')",
                             timeout_s=30, what="the comparison's metrics table")
            shots["compare"] = str(browser.screenshot(out / "mlflow-ui-compare.png"))
            browser.resize(*size)
    nested = sum(1 for r in runs if "mlflow.parentRunId" in r.data.tags)
    return {"experiment_id": exp.experiment_id, "runs": len(runs), "nested_runs": nested,
            "columns": columns, "table_headers": headers, "compared": [r.info.run_name for r in compared],
            "screenshots": shots}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="sqlite:///mlflow.db", help="MLflow backend store URI")
    p.add_argument("--experiment", default="demo")
    p.add_argument("--out", default=str(ROOT / "bench/results"), help="where the PNGs go")
    p.add_argument("--make-runs", metavar="DIR", help="first train 3 tiny runs into DIR/mlflow.db (and use it)")
    p.add_argument("--window", default="2100x1000", help="browser window WIDTHxHEIGHT")
    args = p.parse_args(argv)
    try:
        size = tuple(int(v) for v in args.window.lower().split("x"))
        if len(size) != 2:
            raise ValueError
    except ValueError:
        print(f"error: --window {args.window!r} is not WIDTHxHEIGHT (e.g. 1600x1000)", file=sys.stderr)
        raise SystemExit(2)
    try:
        find_chromium()
        store = make_demo_runs(Path(args.make_runs), args.experiment) if args.make_runs else args.store
        result = capture(store, args.experiment, Path(args.out), size)
    except (UserError, BrowserError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
