"""Where every number a user gives may lie: one table, RANGES, checked once where the number enters (a flag, a
checkpoint's configuration, an argument of extract_features)."""
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """Where a number may lie: finite, at least `low` (above it if `open_low`), at most `high`."""
    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def holds(self, x) -> bool:
        above = self.low is None or (x > self.low if self.open_low else x >= self.low)
        return math.isfinite(x) and above and (self.high is None or x <= self.high)

    def describe(self) -> str:
        shown = lambda x: str(x) if isinstance(x, int) else f"{x:g}"  # 2^63 - 1 in full, 0.5 as 0.5
        if self.high is not None:
            return f"between {shown(self.low)} and {shown(self.high)}"
        if self.open_low:
            return "positive" if self.low == 0 else f"above {shown(self.low)}"
        return f"at least {shown(self.low)}"


FINITE = Range()  # any finite number
RANGES = {  # every number a flag feeds into a formula, by its destination (a config field, a recipe field, ...)
    # the few-shot task and its recipe
    "shots": Range(1), "epochs": Range(0), "lr": Range(0, open_low=True), "batch_size": Range(1),
    # the extraction
    "seeds": Range(0, 2**63 - 1), "max_shots": Range(1), "views": Range(1), "encode_batch_size": Range(1),
    "workers": Range(0),
    # predict.py
    "top_k": Range(1),
    # HeGraphAdapter (HeGraphConfig) and the cache of Tip-Adapter (TipConfig)
    "alpha": Range(0), "gamma": Range(0, open_low=True), "lam": Range(0), "weight_scale": Range(0),
    "bias_scale": Range(0), **{f"beta_{path}": Range(0) for path in ("pn", "vn", "np", "np_test", "vp", "pp", "vv")},
    "neighbours": Range(0), "edge_temperature": Range(0),   # HeGraphConfig's graph designs: 0 turns them off
    # TaskRes, CLIP-Adapter, GraphAdapter, the linear probe
    "scale": Range(0), "ratio": Range(0, 1), "reduction": Range(1), "beta": Range(0, 1), "fusion": Range(0, 1),
    "inverse_l2": Range(0, open_low=True), "max_iter": Range(1),
    # CoOp
    "n_ctx": Range(1),
}
