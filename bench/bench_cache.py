"""What the features file's cache saves (fewshot/cache.py): a prompt change and an added seed on a cached dataset,
against a fresh extraction of the same final settings, measured side by side.

Part 1 runs the real extraction on a generated dataset in DTD's shape (C classes, 60 / 24 / 36 training,
validation and test images a class, as CoOp's split of DTD holds) with a tiny random CLIP (fewshot/testing/
fixtures.py, 32 px, CPU): seeds 1 2 3 at 16 shots and 10 views, then other prompts (--template), then seed 4 added,
and a fresh extraction with seeds 1 2 3 4 beside it, which the grown file must equal tensor for tensor (to a
float16 unit; in float32, --precision fp32). It counts the images and views each step encodes and times it.

Part 2 counts the same for DTD itself: which images a seed's subsets take depends on the split's per-class counts
and the seed alone (datasets.sample_fewshot), so the counts are exact without the images; at RN50's 2.4 views/s on
a CPU core (README) they are minutes.

    python bench/bench_cache.py                 # C = 10 (1,200 small images, about a minute on 2 CPU cores)
    python bench/bench_cache.py --classes 47    # DTD's 47 classes
"""
import argparse
import contextlib
import dataclasses
import io
import tempfile
import time
from pathlib import Path

import torch

from fewshot import extraction, features
from fewshot.datasets import fewshot_rows
from fewshot.testing.fixtures import same_features, tiny_clip, write_dataset

DTD = {"classes": 47, "train": 60, "val": 24, "test": 36}   # CoOp's split of DTD: 2,820 / 1,128 / 1,692 images
RN50_VIEWS_PER_S = 2.4                                       # RN50 on one core of a shared 2-core CPU (README)


def step(settings, root, out, **options):
    """extract() of `settings`, quietly: (Extracted, seconds)."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        done = extraction.extract(settings, root, out, workers=0, device="cpu", **options)
    return done, time.perf_counter() - start


def same(a, b):
    """Two features files equal: every tensor by same_features (features to one float16 unit), everything else by
    ==; the prompt sets and the record of how each was encoded aside."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and same_features(a, b)
    if isinstance(a, dict):
        kept = [k for k in a if k not in ("texts", "encoding")]
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in kept)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def measured(classes, tmp):
    """Part 1: the table rows, and whether the grown file equals the fresh one."""
    counts = {split: [DTD[split]] * classes for split in ("train", "val", "test")}
    root, clip = write_dataset(tmp / "data", "dtd", num_classes=classes, counts=counts), tiny_clip(tmp / "clip.pt")
    # fp32: the exact path, where the grown file is the fresh one's to a float16 unit (bf16: to cosine 0.9999)
    base = features.Settings("dtd", clip_checkpoint=str(clip), seeds=(1, 2, 3), max_shots=16, views=10,
                             precision="fp32")
    first, t_first = step(base, root, tmp / "cache")
    prompt, t_prompt = step(dataclasses.replace(base, template="a close-up of {}."), root, tmp / "cache")
    seed4 = dataclasses.replace(base, seeds=(1, 2, 3, 4))
    grown, t_grown = step(seed4, root, tmp / "cache")
    fresh, t_fresh = step(seed4, root, tmp / "fresh")
    equal = same(torch.load(grown.path, weights_only=True), torch.load(fresh.path, weights_only=True))
    rows = [("seeds 1 2 3, 16 shots, 10 views (fresh)", first, t_first),
            ("other prompts (`--template`) on it", prompt, t_prompt),
            ("seed 4 added to it", grown, t_grown),
            ("seeds 1 2 3 4 (fresh, beside it)", fresh, t_fresh)]
    return rows, equal


def dtd_counts():
    """Part 2: DTD's images and views for seeds 1 2 3, seeds 1 2 3 4, and what seed 4 adds (16 shots, 10 views)."""
    names = [str(c) for c in range(DTD["classes"])]
    labels = {split: [c for c in range(DTD["classes"]) for _ in range(DTD[split])] for split in ("train", "val")}

    def held(seeds):
        train, _ = fewshot_rows(labels["train"], names, 16, seeds, False, "training")
        val, _ = fewshot_rows(labels["val"], names, 4, seeds, False, "validation")
        return set(train), set(val)
    (t3, v3), (t4, v4) = held((1, 2, 3)), held((1, 2, 3, 4))
    test = DTD["test"] * DTD["classes"]
    views = lambda t, v, test: 10 * len(t) + len(v) + test
    return [("seeds 1 2 3 (fresh)", len(t3) + len(v3) + test, views(t3, v3, test)),
            ("seed 4 added", len(t4 - t3) + len(v4 - v3), views(t4 - t3, v4 - v3, 0)),
            ("seeds 1 2 3 4 (fresh)", len(t4) + len(v4) + test, views(t4, v4, test))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=10, help="classes of the generated dataset (default 10)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows, equal = measured(args.classes, Path(tmp))
    print(f"Part 1: a generated DTD-shaped dataset ({args.classes} classes x 60 / 24 / 36 images), tiny random CLIP, "
          f"CPU\n")
    print("| step | images encoded | views encoded | prompt sets encoded | seconds |")
    print("|---|---:|---:|---:|---:|")
    for name, done, seconds in rows:
        print(f"| {name} | {done.images:,} | {done.views_encoded:,} | {done.texts} | {seconds:.1f} |")
    print(f"\nthe file grown by seed 4 equals the fresh extraction of seeds 1 2 3 4, tensor for tensor (to a float16 "
          f"unit): {equal}")
    print(f"seed 4 encoded {rows[2][1].views_encoded / rows[3][1].views_encoded:.1%} of the fresh extraction's views, "
          f"in {rows[2][2] / rows[3][2]:.0%} of its time\n")
    print("Part 2: DTD (47 classes, CoOp's split), 16 shots, 10 views; time at RN50's 2.4 views/s on a CPU core\n")
    print("| extraction | images encoded | views encoded | time with RN50 on a CPU core |")
    print("|---|---:|---:|---:|")
    for name, images, views in dtd_counts():
        minutes = views / RN50_VIEWS_PER_S / 60
        print(f"| {name} | {images:,} | {views:,} | {minutes // 60:.0f} h {minutes % 60:02.0f} min |")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
