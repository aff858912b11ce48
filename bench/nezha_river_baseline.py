"""Baseline for the incident detector choice: river's ``anomaly.GaussianScorer`` in place of the robust
MAD z-score, same engine and evaluation. Run: ``PYTHONPATH=. python bench/nezha_river_baseline.py``
(needs ``river`` and ../shared/data)."""

import json
import math
from pathlib import Path
from statistics import NormalDist

from river import anomaly

import processors.incidents.incident as inc
from processors.incidents.eval_nezha import evaluate


class RiverGaussian:
    """river.anomaly.GaussianScorer over the same window, score mapped to a z (two-sided CDF -> z)."""

    def __init__(self, window=60, min_history=10, direction=1, abs_floor=1e-6, rel_floor=0.1):
        self.g = anomaly.GaussianScorer(window_size=window, grace_period=min_history)
        self.direction = direction
        self.n = 0
        self.mean = 0.0
        self.hist = []

    def update(self, x):
        try:
            s = self.g.score_one(None, x)
        except TypeError:
            s = 0.0
            self.errors = getattr(self, "errors", 0) + 1
            ERR[0] += 1
        med = sum(self.hist[-60:]) / len(self.hist[-60:]) if self.hist else math.nan
        z = NormalDist().inv_cdf(min((1 + s) / 2, 1 - 1e-16)) if s > 0 else 0.0
        if self.direction and self.hist and self.direction * (x - med) < 0:
            z = 0.0
        self.g.learn_one(None, x)
        self.hist.append(x)
        self.hist = self.hist[-60:]
        return z, med


def mk(**kw):
    return RiverGaussian(
        window=kw["window"],
        min_history=kw["min_history"],
        direction=kw["direction"],
        abs_floor=kw["abs_floor"],
    )


inc.RobustZ = mk
ERR = [0]
for thr in (3.0, 4.0, 6.0):
    r = evaluate(Path("/work/shared/data/incidents/nezha"), config=inc.EngineConfig(z_threshold=thr))
    r.pop("per_fault")
    r.pop("import")
    r.pop("engine")
    print("errors", ERR[0])
    ERR[0] = 0
    print(
        thr,
        json.dumps(
            {
                k: r[k]
                for k in (
                    "detected",
                    "detected_within_180s",
                    "median_detection_seconds",
                    "top1",
                    "top3",
                    "incidents",
                    "false_incidents_per_hour",
                )
            }
        ),
    )
