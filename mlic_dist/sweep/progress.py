"""The sweep's compact progress view: one line per change (a trial starts, finishes, fails, is
retried, or beats the best val_mAP) and a heartbeat every `every_s` seconds, instead of Ray's
tables (which the sweep turns off).

    [sweep 00:04:12] 3/8 done, 2 running, 0 failed | best val_mAP 0.8412 size=448,augment=M2 | size=384,augment=M1 finished (40 epochs)
"""
from __future__ import annotations

import sys
import time

from ray.tune import Callback

from ..rundir import best_val_map


class ProgressView(Callback):
    def __init__(self, total: int, every_s: float = 60.0, stream=None, epochs: dict | None = None):
        self.total = total
        self.planned = dict(epochs or {})   # trial name -> train.epochs
        self.every_s = every_s
        self.stream = stream
        self._reset()

    def _reset(self) -> None:
        self.t0 = time.time()
        self.last_line = 0.0
        self.state: dict[str, str] = {}     # trial name -> running | done | failed
        self.epochs: dict[str, int] = {}
        self.best = (float("-inf"), "")
        self._adopted = False

    # A restored sweep unpickles this callback; start the view afresh, then (first step) take
    # what the restored trials already did: "3/8 done" and their best, not "0/8" and a false best.
    def setup(self, **info) -> None:
        self._reset()

    def on_step_begin(self, iteration, trials, **info):
        if not self._adopted:
            self._adopted = True
            self._adopt(trials)

    def _adopt(self, trials) -> None:
        done = 0
        for trial in trials:
            last = getattr(trial, "last_result", None) or {}
            name = str(trial)
            if last.get("epochs_done"):
                self.epochs[name] = int(last["epochs_done"])
            value = best_val_map([last]) if last else None
            if isinstance(last.get("best_val_mAP"), (int, float)):
                value = max(v for v in (value, last["best_val_mAP"]) if v is not None)
            if value is not None and value > self.best[0]:
                self.best = (value, name)
            if getattr(trial, "status", None) == "TERMINATED":
                self.state[name], done = "done", done + 1
        if done:
            self._line(f"resumed: {done} trial(s) already done")

    def __getstate__(self):
        d = dict(self.__dict__)
        d["stream"] = None  # sys.stdout does not pickle; the restored view prints to stdout
        return d

    # ---------------------------------------------------------------- Tune hooks

    def on_trial_start(self, iteration, trials, trial, **info):
        self._set(trial, "running", "started")

    def on_trial_restore(self, iteration, trials, trial, **info):
        self._set(trial, "running", "restored")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._set(trial, "running", "failed, retrying")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        name = str(trial)
        epochs = int(result.get("epochs_done", 0))
        if epochs <= self.epochs.get(name, 0):
            return   # an epoch reported again after a worker restart: nothing new, and no "new best"
        self.epochs[name] = epochs
        value = best_val_map([result])   # val_mAP or, where the weight EMA did better, val_mAP_ema
        if value is not None and value > self.best[0]:
            self.best = (value, name)
            self._line(f"{name} epoch {self.epochs[name]}: new best")

    def on_trial_complete(self, iteration, trials, trial, **info):
        n, planned = self.epochs.get(str(trial), 0), self.planned.get(str(trial), 0)
        self._set(trial, "done", f"ended after {n}/{planned} epochs" if n < planned else f"finished ({n} epochs)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._set(trial, "failed", "FAILED (see its train.log and Ray's logs)")

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self.last_line >= self.every_s:
            running = [n for n, s in self.state.items() if s == "running"]
            detail = ", ".join(f"{n} {self.epochs.get(n, 0)} epochs" for n in running[:4])
            self._line(detail or "waiting for resources")

    # ---------------------------------------------------------------- output

    def _set(self, trial, state: str, what: str) -> None:
        self.state[str(trial)] = state
        self._line(f"{trial} {what}")

    def summary(self) -> str:
        states = list(self.state.values())
        done, running, failed = (states.count(s) for s in ("done", "running", "failed"))
        best = f"best val_mAP {self.best[0]:.4f} {self.best[1]}" if self.best[1] else "best val_mAP -"
        return f"{done}/{self.total} done, {running} running, {failed} failed | {best}"

    def _line(self, event: str) -> None:
        elapsed = int(time.time() - self.t0)
        stamp = f"{elapsed // 3600:02d}:{elapsed % 3600 // 60:02d}:{elapsed % 60:02d}"
        print(f"[sweep {stamp}] {self.summary()} | {event}", file=self.stream or sys.stdout, flush=True)
        self.last_line = time.time()
