"""
Accuracy on real CLIP features, through train.py's own code.

Reads ../shared/realfeats/imagenet_vitb32_dev.pt (real OpenAI CLIP ViT-B/32 features of 3,484 ImageNet
training images of 500 classes, one row per image = the mean of 10 augmented views; see its README).
It is never copied into the project: this script reads it from there and skips when it is absent.

Protocol (the file's README): for K in 1, 2, 4 and seeds 1, 2, 3, K images per class for training and
the rest as the test set; mean test accuracy over seeds. The positive prompt is "a photo of a {}.". The
file has no negative prompts, so HeGraphAdapter runs as `hegraph --no-negatives` and `hegraph-tp`.

    python bench/real_features.py [--file PATH] [--shots 1 2 4] [--seeds 1 2 3]
    python bench/real_features.py --dev --shots 1 2 3 -- --bias-scale 0.1   # compare a default on the tuning protocol
"""

import os
os.environ.setdefault("TQDM_DISABLE", "1")  # set before torch imports tqdm: one table, no progress bars

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (after the path is set)
from features_file import FORMAT  # noqa: E402

DEFAULT_FILE = ROOT.parent / "shared" / "realfeats" / "imagenet_vitb32_dev.pt"
RUNS = {  # row name -> train.py arguments
    "zeroshot": ["--method", "zeroshot"],
    "linear-probe": ["--method", "linear-probe"],
    "tip": ["--method", "tip"],
    "tip-f": ["--method", "tip-f"],
    "taskres": ["--method", "taskres"],
    "clip-adapter": ["--method", "clip-adapter"],
    "graphadapter": ["--method", "graphadapter"],
    "hegraph-bias --no-negatives": ["--method", "hegraph-bias", "--no-negatives"],
    "hegraph --no-negatives": ["--method", "hegraph", "--no-negatives"],
    "hegraph-tp": ["--method", "hegraph-tp", "--no-negatives"],
}


DEV_FOLDS = 4  # the tuning protocol rotates the 4-shot pool: each of its images validates in some fold


def features_file(real, shots, seed, path, dev=False, fold=0):
    """Write a features file (train.py's format) for one K and seed: K per class train, the rest test.

    dev: the tuning protocol; only the seed's 4-shot training images are used, K of them per class to
    train and the other 4 - K to validate, so the 4-shot runs' test images are never looked at. fold
    rotates the pool, so that over DEV_FOLDS folds every image of it trains and validates.
    """
    feats, labels = real["image_features"], real["labels"]
    C = len(real["classnames"])
    gen = torch.Generator().manual_seed(seed)
    train_rows, test_rows = [], []
    for c in range(C):
        rows = (labels == c).nonzero().flatten()                        # sorted: deterministic order
        rows = rows[torch.randperm(len(rows), generator=gen)]
        if dev:
            rows = rows[:4].roll(-fold)
        train_rows.append(rows[:shots])
        test_rows.append(rows[shots:])
    train_rows, test_rows = torch.cat(train_rows), torch.cat(test_rows)
    torch.save({
        "format": FORMAT, "dataset": "imagenet", "backbone": real["backbone"], "logit_scale": 100.0,
        "classnames": real["classnames"], "prompts": {"positive": ["a photo of a {}."]},
        "text": {"positive": real["text_features"]["a photo of a {}."]},
        "train": {"features": feats[train_rows][None], "labels": labels[train_rows]},   # [V=1, N, d]
        "test": {"features": feats[test_rows], "labels": labels[test_rows]},
        "fewshot": {seed: torch.arange(C * shots).view(C, shots)},
    }, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the real features (default %(default)s)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS), metavar="ROW")
    p.add_argument("--dev", action="store_true", help="the tuning protocol (features_file), K in 1 2 3 only")
    p.add_argument("extra", nargs="*", help="more train.py arguments after --, e.g. -- --beta-vp 0.2")
    args = p.parse_args()
    if not args.file.is_file():
        print(f"skipped: {args.file} is absent (it lives in shared/realfeats, never in the project)")
        return
    real = torch.load(args.file, weights_only=True)
    table = {}  # (row, K) -> [accuracy per seed]
    seconds, params = {}, {}  # row -> [seconds per epoch of each run], row -> tunable parameters
    folds = range(DEV_FOLDS if args.dev else 1)
    with tempfile.TemporaryDirectory() as tmp:
        for shots in args.shots:
            for seed in args.seeds:
                accs = {}  # row -> [accuracy per fold]
                for fold in folds:
                    path = Path(tmp) / f"real_{shots}shot_seed{seed}_fold{fold}.pt"
                    features_file(real, shots, seed, path, dev=args.dev, fold=fold)
                    for row in args.methods:
                        argv = ["--features", str(path), "--shots", str(shots), "--seeds", str(seed), *RUNS[row],
                                *args.extra]
                        with contextlib.redirect_stdout(io.StringIO()):  # one table at the end, not one per run
                            result = train.run(train.parse_args(argv))
                        accs.setdefault(row, []).append(result["test_accuracy"])
                        seconds.setdefault(row, []).extend(result["epoch_seconds"].values())
                        params[row] = result["params"]
                for row, a in accs.items():
                    table.setdefault((row, shots), []).append(sum(a) / len(a))
    protocol = f"DEV protocol (tuning, {DEV_FOLDS} folds, see features_file): " if args.dev else ""
    print(f"\n{protocol}Real CLIP {real['backbone']} ImageNet features ({len(real['classnames'])} classes): "
          f"test accuracy %, mean ± std over seeds {args.seeds}")
    print(f"{'method':<30}" + "".join(f"{f'K={k}':>16}" for k in args.shots) + f"{'s/epoch':>10}{'params':>12}")
    for row in args.methods:
        cells = [torch.tensor(table[row, k]) for k in args.shots]
        print(f"{row:<30}" + "".join(f"{c.mean():>9.2f} ± {c.std() if len(c) > 1 else 0:.2f}" for c in cells)
              + f"{sum(seconds[row]) / len(seconds[row]):>10.3f}{params[row]:>12,}")


if __name__ == "__main__":
    main()
