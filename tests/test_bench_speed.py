"""bench/bench_speed.py: its timing machinery runs both models' training steps (tiny sizes, no timing claims)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_speed


def test_time_pair_steps_both_models_and_they_learn():
    feats = bench_speed.make_features(C=6, d=16, K=2, device=torch.device("cpu"))
    seconds, repeats = bench_speed.time_pair(feats, B=8, device=torch.device("cpu"), warmup=1, repeats=2)
    assert set(seconds) == {"full", "tipf"} and repeats == 2 and all(s > 0 for s in seconds.values())
    for method in bench_speed.METHODS:
        model, opt = bench_speed.build(method, feats)
        before = [p.detach().clone() for p in model.parameters()]
        bench_speed.train_step(model, opt, bench_speed.make_batch(feats, 8))
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), method
