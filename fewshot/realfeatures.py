"""
Accuracy on real CLIP features (bench/real_features.py): every method through train.py's own code, once with its
published defaults and once tuned on the dev folds with the same budget (methods.py: at most 12 settings per
method).

Reads ../shared/realfeats/imagenet_vitb32_dev.pt (real OpenAI CLIP ViT-B/32 features of ImageNet training
images, one row per image = the mean of 10 augmented views; see its README). It is never copied into the
project: this script reads it from there and skips when it is absent.

Tasks, each built from the same file: the whole file (imagenet-500: its 500 classes), a fine-grained group
(the 50 classes around the class whose visual neighbourhood is densest: the dog breeds on ImageNet), and
random subsets of 50 and 100 classes (drawn with a fixed generator). The file has no negative prompts, so
HeGraphAdapter runs as `hegraph --no-negatives` and `hegraph-tp`.

Protocol, for seeds 1, 2, 3 (assign): each seed first assigns every image of the file once, by a seeded
permutation of each class: its first POOL = 4 images are the class's pool, the others its test set. Every task
(the sub-tasks too: the assignment is made on the whole file, before any task is cut from it), every K and
every dev fold reads the same assignment, so no test image is ever read by a training draw, a dev fold or a
search:
- test: for K = 1, 2, 4, the first K pool images of each class train; the test set is the class's test images,
  the same for every K.
- dev (the tuning protocol): the pool only: K' = 1, 2, 3 of its 4 images train and the other 4 - K' validate,
  rotated over 4 folds so that each pool image trains and validates.
Tuned block: for each method and task, every point of its grid is scored on the dev folds (mean over seeds,
folds and K'), and the best (the first of equal scores) is run on the test protocol.

    python bench/real_features.py                                     # every task, both blocks
    python bench/real_features.py --tasks imagenet-500 --block defaults --rows tip-f hegraph
    python bench/real_features.py --dev --rows hegraph -- --bias-scale 0.2   # one setting on the dev folds
    python bench/real_features.py --study --tasks random-50 --designs E1 E4  # graph designs vs the bias-only

Finished units are kept in --cache (a jsonl file), so an interrupted run resumes where it stopped.
"""

import argparse
import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fewshot import training
from fewshot.cli import overrides_from_args, train_parser
from fewshot.features import FORMAT
from fewshot.methods import METHODS, grid
from fewshot.runs import make_plan
from fewshot.tasks import make_task

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "shared" / "realfeats" / "imagenet_vitb32_dev.pt"


@dataclass(frozen=True)
class Row:
    """One row of the tables: a method, and how it runs here."""
    method: str                                    # its row in METHODS
    no_negatives: bool = False                     # the file has no negative prompts
    config: dict = field(default_factory=dict)     # config settings over the method's published ones


ROWS = {name: Row(name) for name in ("zeroshot", "linear-probe", "tip", "tip-f", "taskres", "clip-adapter",
                                     "graphadapter")}
ROWS |= {name: Row(name, no_negatives=True) for name in ("hegraph-bias", "hegraph", "hegraph-tp")}
# the graph designs of HeGraphConfig (hegraphadapter.py, E1-E5), each tuned with the same budget as every
# method: 12 points, its own knob with s_b and α (post-hoc), or s_W where the design has no knob of its own
_HEGRAPH = Row("hegraph", no_negatives=True)
_TUNED = {"bias_scale": (0.1, 0.2), "alpha": (1.0, 2.0)}
STUDY = {  # row -> (how it runs, knobs)
    "E1 own-class edges": (_HEGRAPH, {"own_class_paths": ("vp", "vp,vv", "vp,vv,pp"), **_TUNED}),
    "E2 sparse edges": (_HEGRAPH, {"neighbours": (5, 10, 20), **_TUNED}),
    "E3 sharpened edges": (_HEGRAPH, {"edge_temperature": (0.03, 0.1, 0.3), **_TUNED}),
    "E4 class-specific messages": (Row("hegraph", True, {"centre_messages": True}),
                                   {"weight_scale": (0.1, 0.3, 1.0), **_TUNED}),
    "E5 tanh messages": (Row("hegraph", True, {"message_activation": "tanh"}),
                         {"weight_scale": (0.1, 0.3, 1.0), **_TUNED}),
}
TASKS = ("imagenet-500", "fine-grained-50", "random-50", "random-100")
TEST_SHOTS = (1, 2, 4)
POOL = max(TEST_SHOTS)  # each class's pool, per seed: every K-shot draw and every dev fold comes from it
DEV_FOLDS = 4       # the tuning protocol rotates the pool: each of its images validates in some fold
DEV_SHOTS = (1, 2, 3)
SEEDS = (1, 2, 3)
PROTOCOL = "pool-4"  # in every cache key: units of the earlier protocol (test images in the dev pool) never match


# -----------------------------------------------------------------------------
# tasks: the whole file, or some of its classes

def class_means(real):
    """[C, d] normalised mean image feature of each class."""
    feats, labels = real["image_features"].float(), real["labels"]
    return F.normalize(torch.zeros(len(real["classnames"]), feats.shape[1]).index_add_(0, labels, feats), dim=-1)


def task_classes(real, name):
    """The class indices of a task. fine-grained-N: the class whose N - 1 nearest classes (cosine of class
    means) are nearest on average, and those; random-N: N classes from a generator seeded with 0."""
    C = len(real["classnames"])
    if name.startswith("imagenet-") or name == "all":
        return list(range(C))
    size = int(name.rsplit("-", 1)[1])
    if size > C:
        raise SystemExit(f"error: task {name} needs {size} classes and the file has {C}")
    if name.startswith("random-"):
        return sorted(torch.randperm(C, generator=torch.Generator().manual_seed(0))[:size].tolist())
    sims = class_means(real) @ class_means(real).T                          # [C, C]
    sims.fill_diagonal_(-2.0)
    centre = sims.topk(size - 1, dim=1).values.mean(1).argmax().item()
    return sorted([centre, *sims[centre].topk(size - 1).indices.tolist()])


def assign(real, seeds=SEEDS):
    """The file with each seed's assignment of its images: "order" {seed: [N]} is each image's place in its class's
    seeded permutation (places 0..POOL-1: the pool; the others: the test set), and "image" [N] each row's index in
    the file. Made once, on the whole file, so that every task cut from it (subtask) keeps it."""
    labels = real["labels"]
    counts = torch.bincount(labels, minlength=len(real["classnames"]))
    if counts.min() < POOL:
        raise SystemExit(f"error: class {counts.argmin().item()} has {counts.min().item()} images; the protocol "
                         f"needs at least {POOL} per class (its pool)")
    order = {}
    for seed in seeds:
        gen, place = torch.Generator().manual_seed(seed), torch.empty_like(labels)
        for c in range(len(real["classnames"])):
            rows = (labels == c).nonzero().flatten()                    # sorted: deterministic order
            place[rows[torch.randperm(len(rows), generator=gen)]] = torch.arange(len(rows))
        order[seed] = place
    return {**real, "order": order, "image": torch.arange(len(labels))}


def subtask(real, classes):
    """The file (assigned) restricted to `classes`, relabelled 0..len(classes) - 1 in that order; each image keeps
    its place in the whole file's assignment."""
    relabel = torch.full((len(real["classnames"]),), -1, dtype=torch.long)
    relabel[classes] = torch.arange(len(classes))
    keep = relabel[real["labels"]] >= 0
    return {"image_features": real["image_features"][keep], "labels": relabel[real["labels"][keep]],
            "text_features": {t: f[classes] for t, f in real["text_features"].items()},
            "classnames": [real["classnames"][c] for c in classes], "backbone": real["backbone"],
            "order": {seed: place[keep] for seed, place in real["order"].items()}, "image": real["image"][keep]}


def task_rows(real, shots, seed, dev=False, fold=0):
    """The rows of one K and seed, from the seed's assignment: ([C * K] training rows, class-major, and the
    held-out rows, class-major too).

    test: the first K pool images of each class train, and the class's test images (places POOL and up) are held
    out, the same for every K. dev: the pool alone, rotated by `fold`; its first K train and the other POOL - K
    validate."""
    labels, place = real["labels"], real["order"][seed]
    pool = place < POOL
    position = (place - fold) % POOL if dev else place                       # in the class's (rotated) pool
    in_order = lambda mask: (rows := mask.nonzero().flatten())[(labels[rows] * len(labels) + position[rows]).argsort()]
    held = pool & (position >= shots) if dev else ~pool
    return in_order(pool & (position < shots)), in_order(held)


def task_data(real, shots, seed, dev=False, fold=0):
    """A features dict (train.py's format) for one K and seed (task_rows), with "images": the file's indices of
    its training and held-out images.

    dev: the tuning protocol; the held-out pool images are both the "val" and the "test" split of the dict.
    """
    feats, labels = real["image_features"], real["labels"]
    C = len(real["classnames"])
    rows, held_out = task_rows(real, shots, seed, dev, fold)                  # [C * K], [T]
    data = {
        "format": FORMAT, "dataset": "imagenet", "backbone": real["backbone"], "logit_scale": 100.0,
        "classnames": real["classnames"], "prompts": {"positive": ["a photo of a {}."]},
        "text": {"positive": real["text_features"]["a photo of a {}."]},
        "train": {"features": feats[rows][None], "labels": labels[rows]},
        "test": {"features": feats[held_out], "labels": labels[held_out]},
        "fewshot": {seed: torch.arange(C * shots).view(C, shots)},
        "images": {"train": real["image"][rows], "held_out": real["image"][held_out]},
    }
    if dev:  # every class has POOL - K validation images
        data["val"] = data["test"]
        data["val_fewshot"] = {seed: torch.arange(C * (POOL - shots)).view(C, POOL - shots)}
    return data


def features_file(real, shots, seed, path, dev=False, fold=0):
    """task_data written as a features file (for train.py --features)."""
    torch.save(task_data(real, shots, seed, dev, fold), path)


# -----------------------------------------------------------------------------
# runs, each through train.py's own functions; finished ones kept in the cache

class Missing(Exception):
    """A unit that a cache opened with only_cached does not hold."""


class Cache:
    """Finished units, one json line each: {"key": [...], "value": ...}; a rerun skips them. only_cached: never
    compute, raise Missing instead (the tables of what has finished)."""

    def __init__(self, path, only_cached=False):
        self.path, self.done, self.only_cached, self.pending = path, {}, only_cached, []
        if path and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.done[json.dumps(entry["key"])] = entry["value"]

    def get(self, key, compute, *args):
        """The value of `key`: from the file, or compute(*args), then kept."""
        k = json.dumps(key)
        if k not in self.done and self.only_cached:
            raise Missing(key)
        if k not in self.done:
            self.done[k] = compute(*args)
            if self.path:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"key": key, "value": self.done[k]}) + "\n")
        return self.done[k]


def plan_for(row, data, shots, overrides=({}, {})):
    """train.py's plan of the row on this data: its method, published config and recipe, with the row's config
    and any overrides (recipe settings, config settings) applied."""
    spec = ROWS[row] if row in ROWS else STUDY[row][0]
    recipe, config = overrides
    return make_plan(data["dataset"], spec.method, shots, no_negatives=spec.no_negatives,
                     config={**spec.config, **config}, recipe=recipe)


def points_of(row, plan):
    """The grid a row is tuned over: its method's knobs (methods.py), or a study row's own."""
    if row not in STUDY:
        return grid(METHODS[plan.method], plan.dataset, plan.recipe)
    knobs = STUDY[row][1]
    return [dict(zip(knobs, values)) for values in itertools.product(*knobs.values())]


def test_accuracy(row, data, shots, seed, point, overrides=({}, {})):
    """The row trained at a grid point ({} = its defaults) on one seed's task, scored on the test split."""
    plan = plan_for(row, data, shots, overrides)
    method = METHODS[plan.method]
    task = make_task(data, seed, shots, "cpu", negatives=False)
    torch.manual_seed(seed)
    model, info = training.fit_at(method, task, plan.config, plan.recipe, point, seed)
    model = training.with_post_hoc(method, task, model, point)
    return {"acc": training.accuracy(model, *task.test), "epoch_seconds": info.get("epoch_seconds", 0.0),
            "params": training.tunable_parameters(model)}


def dev_scores(row, real, shots, seed, fold):
    """Every grid point of the row scored on one dev fold's validation images: [accuracy per point]."""
    data = task_data(real, shots, seed, True, fold)
    plan = plan_for(row, data, shots)
    method = METHODS[plan.method]
    task = make_task(data, seed, shots, "cpu", negatives=False)
    torch.manual_seed(seed)
    points = points_of(row, plan)
    _, _, scores = training.score_grid(method, task, plan.config, plan.recipe, points, seed, *task.val)
    return [acc for _, acc in scores]


def identity(row, shots):
    """What a unit of the row at K runs, for its cache key: the protocol, and the plan's recipe and config (a change
    to a method's published recipe or configuration is another unit, never a stale one reused)."""
    plan = plan_for(row, {"dataset": "imagenet"}, shots)
    return [PROTOCOL, plan.recipe and dataclasses.asdict(plan.recipe), dataclasses.asdict(plan.config)]


def dev_units(cache, real, task_name, row):
    """The row's grid, and every point's dev accuracy on every fold: {(K', seed, fold): [accuracy per point]}."""
    points = points_of(row, plan_for(row, {"dataset": "imagenet"}, 1))
    units = {}
    for shots, seed, fold in itertools.product(DEV_SHOTS, SEEDS, range(DEV_FOLDS)):
        key = ["dev", task_name, row, shots, seed, fold, points, identity(row, shots)]
        units[shots, seed, fold] = cache.get(key, dev_scores, row, real, shots, seed, fold) if points else []
    return points, units


def tune(cache, real, task_name, row):
    """The row's grid point with the best mean dev accuracy (the first of equal ones), and every point's mean."""
    return best_point(*dev_units(cache, real, task_name, row))


def best_point(points, units):
    """The point with the best mean over the dev units (the first of equal ones), and every point's mean."""
    if not points:
        return {}, []
    means = torch.tensor(list(units.values()), dtype=torch.float64).mean(0).tolist()
    best = max(range(len(points)), key=lambda i: (means[i], -i))
    return points[best], list(zip(points, means))


def block(cache, real, task_name, rows, tuned):
    """{row: {"point": grid point, "acc": {K: [per seed]}, "epoch_seconds", "params", "dev": [(point, mean)]}}."""
    out = {}
    for row in rows:
        try:
            point, dev = tune(cache, real, task_name, row) if tuned else ({}, [])
            accs, seconds = {}, []
            for shots in TEST_SHOTS:
                for seed in SEEDS:
                    key = ["test", task_name, row, shots, seed, point, identity(row, shots)]
                    r = cache.get(key, test_accuracy, row, task_data(real, shots, seed), shots, seed, point)
                    accs.setdefault(shots, []).append(r["acc"])
                    seconds.append(r["epoch_seconds"])
                    params = r["params"]
        except Missing:  # --finished: a row with a unit still to run is left out, and named
            cache.pending.append(row)
            continue
        out[row] = {"point": point, "acc": accs, "epoch_seconds": sum(seconds) / len(seconds), "params": params,
                    "dev": dev}
        print(f"  {task_name} {'tuned' if tuned else 'defaults'} {row}: " +
              " ".join(f"K={k} {mean_std(a)}" for k, a in accs.items()), flush=True)
    return out


def _mean_where(scores, field, value):
    """Mean of {(K', seed, fold): accuracy} over the units whose field-th entry is value."""
    picked = [acc for unit, acc in scores.items() if unit[field] == value]
    return sum(picked) / len(picked)


def study(cache, real, task_name, rows):
    """The graph study on the dev folds only: each row tuned on its grid, then its dev accuracy at the chosen
    point, per K' and per seed (mean over the folds). {row: {"point", "per_k": {K': mean}, "per_seed": [...]}}."""
    out = {}
    for row in rows:
        points, units = dev_units(cache, real, task_name, row)
        point, _ = best_point(points, units)
        chosen = {unit: scores[points.index(point)] for unit, scores in units.items()}  # (K', seed, fold) -> acc
        out[row] = {"point": point, "per_k": {k: _mean_where(chosen, 0, k) for k in DEV_SHOTS},
                    "per_seed": [_mean_where(chosen, 1, s) for s in SEEDS]}
        print(f"  {task_name} study {row}: {shown(point)}: " + " ".join(f"K'={k} {v:.2f}" for k, v in
                                                                      out[row]["per_k"].items()), flush=True)
    return out


# -----------------------------------------------------------------------------
# tables

def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.2f} ± {t.std() if len(t) > 1 else 0:.2f}"


def shown(point):
    return ", ".join(f"{k} {v:g}" if isinstance(v, float | int) else f"{k} {v}" for k, v in point.items()) or "–"


def markdown_block(results, title, tuned):
    """One task's block: mean ± std over seeds per K, seconds per epoch, parameters (and the tuned point)."""
    head = "| method | " + " | ".join(f"K = {k}" for k in TEST_SHOTS) + " | s / epoch | params |"
    head += " chosen on the dev folds |" if tuned else ""
    lines = [f"**{title}**", "", head, "|---" * (len(TEST_SHOTS) + 3 + tuned) + "|"]
    for row, r in results.items():
        cells = [mean_std(r["acc"][k]) for k in TEST_SHOTS]
        secs = f"{r['epoch_seconds']:.3f}" if r["epoch_seconds"] else "–"
        lines.append(f"| `{row}` | " + " | ".join(cells) + f" | {secs} | {r['params']:,} |" +
                     (f" {shown(r['point'])} |" if tuned else ""))
    return "\n".join(lines)


def markdown_differences(results, ours, title):
    """ours minus each other row, per seed (the same task), as mean ± std of the paired differences."""
    lines = [f"**{title}: `{ours}` minus each method, per seed**", "",
             "| against | " + " | ".join(f"K = {k}" for k in TEST_SHOTS) + " | mean over K |",
             "|---" * (len(TEST_SHOTS) + 2) + "|"]
    for row, r in results.items():
        if row == ours:
            continue
        diffs = {k: [a - b for a, b in zip(results[ours]["acc"][k], r["acc"][k])] for k in TEST_SHOTS}
        overall = [sum(d[i] for d in diffs.values()) / len(diffs) for i in range(len(SEEDS))]
        lines.append(f"| `{row}` | " + " | ".join(f"{mean_std(diffs[k])}" for k in TEST_SHOTS) +
                     f" | {mean_std(overall)} |")
    return "\n".join(lines)


def seed_means(r):
    """Each seed's accuracy averaged over K = 1, 2, 4 (the seeds stay paired across methods)."""
    return [sum(r["acc"][k][i] for k in TEST_SHOTS) / len(TEST_SHOTS) for i in range(len(SEEDS))]


def markdown_summary(blocks, ours="hegraph"):
    """Two small tables over every task: each method's accuracy (mean over K, both blocks), and in the tuned
    block `ours` minus each method (per seed, then mean ± std). blocks: {(task, tuned): results}."""
    tasks = list(dict.fromkeys(task for task, _ in blocks))
    columns = [(task, tuned) for task in tasks for tuned in (False, True) if (task, tuned) in blocks]
    rows = list(dict.fromkeys(row for results in blocks.values() for row in results))
    names = {False: "defaults", True: "tuned"}
    lines = [f"**Test accuracy %, mean over K = {', '.join(map(str, TEST_SHOTS))} (± std over seeds "
             f"{', '.join(map(str, SEEDS))} of each seed's mean over K)**", "",
             "| method | " + " | ".join(f"{task} {names[tuned]}" for task, tuned in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        lines.append(f"| `{row}` | " + " | ".join(mean_std(seed_means(blocks[c][row])) if row in blocks[c] else "–"
                                                   for c in columns) + " |")
    tuned = [task for task in tasks if (task, True) in blocks and ours in blocks[task, True]]
    if tuned:
        lines += ["", f"**Tuned block: `{ours}` minus each method, mean over K, per seed (mean ± std over seeds)**",
                  "", "| against | " + " | ".join(tuned) + " |", "|---" * (len(tuned) + 1) + "|"]
        for row in rows:
            if row == ours:
                continue
            cells = []
            for task in tuned:
                results = blocks[task, True]
                cells.append(mean_std([a - b for a, b in zip(seed_means(results[ours]), seed_means(results[row]))])
                             if row in results else "–")
            lines.append(f"| `{row}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def drawn_rows(blocks, ours="hegraph", strongest=3, reference="zeroshot"):
    """The rows the figure draws: `ours`, the `strongest` other rows (by accuracy, mean over the figure's tasks,
    K and seeds), and the `reference` (zero-shot), in the tables' order; and the rows left to the tables."""
    shown = {task: blocks.get((task, True)) or blocks[task, False] for task, _ in blocks}
    rows = list(dict.fromkeys(row for results in shown.values() for row in results))
    def score(row):
        accs = [a for results in shown.values() if row in results for k in TEST_SHOTS for a in results[row]["acc"][k]]
        return sum(accs) / len(accs)
    others = sorted((row for row in rows if row not in (ours, reference)), key=score, reverse=True)
    drawn = {ours, reference, *others[:strongest]}
    return [row for row in rows if row in drawn], [row for row in rows if row not in drawn]


def plot(blocks, path, backbone):
    """One panel per task: test accuracy vs K (mean ± std over seeds) in the tuned block (the published defaults
    where a task has no tuned block) of HeGraphAdapter, the three strongest other methods and zero-shot, in
    report.py's styles; the other methods are named under the panels (they are in the tables). blocks:
    {(task, tuned): results}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fewshot import report

    tasks = list(dict.fromkeys(task for task, _ in blocks))
    drawn, left = drawn_rows(blocks)
    # a method's look does not depend on what is drawn: the styles of every row, in the tables' order
    styles = report.method_styles(list(dict.fromkeys(row for results in blocks.values() for row in results)))
    cols = min(len(tasks), 2)                              # two panels a row: readable at a page's width
    rows_of_panels = -(-len(tasks) // cols)
    width = max(7.0, 5.2 * cols + 0.4)                     # room for the title and the legend with one panel
    fig, axes = plt.subplots(rows_of_panels, cols, figsize=(width, 3.9 * rows_of_panels + 1.2),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    same = {}
    for ax, task in zip(axes.flat, tasks):
        results = blocks.get((task, True)) or blocks[task, False]
        curves = {row: [(k, *report.mean_std(results[row]["acc"][k])) for k in TEST_SHOTS]
                  for row in drawn if row in results}
        report.clip_below_zeroshot(ax, {m: [(mean, std) for _, mean, std in c] for m, c in curves.items()})
        same[task] = report.draw_panel(ax, curves, styles, list(TEST_SHOTS))
        ax.set_title(f"{task} ({'tuned' if (task, True) in blocks else 'published defaults'})")
        ax.set_xlabel("shots per class (K)")
        ax.set_ylabel("test accuracy (%)")
    notes = [report.same_curve_notes(same, tasks)] + \
        ([f"Not drawn (the tables give them): {', '.join(left)}."] if left else [])
    report.figure_legend(fig, axes.flat, width, " ".join(n for n in notes if n))
    report.figure_title(fig, f"Real CLIP {backbone} features: test accuracy, mean ± std over seeds "
                             f"{', '.join(map(str, SEEDS))}")
    fig.savefig(path, dpi=130)
    plt.close(fig)


def markdown_study(results, title, against="hegraph-bias"):
    """Each design's dev accuracy at its tuned point, and its difference to `against` per seed (paired)."""
    lines = [f"**{title}**", "", "| design | chosen on the dev folds | " + " | ".join(f"K' = {k}" for k in DEV_SHOTS)
             + f" | mean | minus `{against}` (per seed) |", "|---" * (len(DEV_SHOTS) + 4) + "|"]
    base = results[against]["per_seed"]
    for row, r in results.items():
        diff = [a - b for a, b in zip(r["per_seed"], base)]
        lines.append(f"| `{row}` | {shown(r['point'])} | " + " | ".join(f"{r['per_k'][k]:.2f}" for k in DEV_SHOTS)
                     + f" | {sum(r['per_seed']) / len(SEEDS):.2f} | {'–' if row == against else mean_std(diff)} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the --dev mode: one setting of some rows on the dev folds (as the defaults were chosen)

def dev_table(real, rows, extra):
    """Mean over folds of each seed's dev accuracy, then mean ± std over seeds, per K' (and their mean).
    extra: train.py flags, read by train.py's own parser."""
    overrides = overrides_from_args(train_parser().parse_args(extra))
    print(f"{'method':<16}" + "".join(f"{f'K={k}':>16}" for k in DEV_SHOTS) + f"{'mean':>10}")
    for row in rows:
        per_k = {}
        for shots in DEV_SHOTS:
            for seed in SEEDS:
                folds = [test_accuracy(row, task_data(real, shots, seed, True, f), shots, seed, {}, overrides)["acc"]
                         for f in range(DEV_FOLDS)]
                per_k.setdefault(shots, []).append(sum(folds) / len(folds))
        overall = sum(sum(v) / len(v) for v in per_k.values()) / len(per_k)
        print(f"{row:<16}" + "".join(f"{mean_std(per_k[k]):>16}" for k in DEV_SHOTS) + f"{overall:>10.2f}",
              flush=True)


def run_study(real, args):
    """--study: the graph designs against the bias-only ablation on every task's dev folds."""
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    cache, sections = Cache(args.cache), []
    for task_name in args.tasks:
        sub = subtask(real, task_classes(real, task_name))
        designs = [row for name in dict.fromkeys(args.designs) for row in STUDY if row.split()[0] == name]
        results = study(cache, sub, task_name, ["hegraph-bias", "hegraph", *designs])
        sections.append(markdown_study(results, f"{task_name} ({len(sub['classnames'])} classes): dev accuracy %, "
                                       f"mean over seeds {', '.join(map(str, SEEDS))} and {DEV_FOLDS} folds"))
    text = "\n\n".join(sections)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "graph_study.md").write_text(text + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the real features (default %(default)s)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK",
                   help=f"imagenet-500 (every class), fine-grained-N, random-N (default: {' '.join(TASKS)})")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                   help=f"methods (default all: {' '.join(ROWS)})")
    p.add_argument("--block", choices=("defaults", "tuned", "both"), default="both",
                   help="published defaults, tuned on the dev folds, or both (default)")
    p.add_argument("--cache", type=Path, default=Path("results/real_features.jsonl"),
                   help="finished units, reused by a rerun (default %(default)s)")
    p.add_argument("--out", type=Path, help="also write the tables (markdown) and the results (json) here")
    p.add_argument("--finished", action="store_true", help="run nothing: the tables of the blocks whose every unit is "
                   "in --cache, the others named as not finished")
    p.add_argument("--dev", action="store_true", help="only the dev-fold table of --rows with the flags after --")
    p.add_argument("--study", action="store_true", help="the graph study on the dev folds: hegraph-bias, hegraph "
                   "and each graph design of STUDY, each tuned with the same budget (no test image is used)")
    p.add_argument("--designs", nargs="+", default=[row.split()[0] for row in STUDY], metavar="E",
                   choices=[row.split()[0] for row in STUDY],
                   help="with --study: the designs to run, in this order (default all)")
    p.add_argument("extra", nargs="*", help="with --dev: train.py flags after --, e.g. -- --beta-vp 0.2")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.file.is_file():
        print(f"skipped: {args.file} is absent (it lives in shared/realfeats, never in the project)")
        return
    torch.set_num_threads(1)  # small matrices: one thread per process; run two processes on two cores
    real = assign(torch.load(args.file, weights_only=True))
    if args.dev:
        return dev_table(real, args.rows, args.extra)
    if args.study:
        return run_study(real, args)
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    cache, sections, everything, blocks = Cache(args.cache, args.finished), [], {}, {}
    whole = {}  # the blocks with every row: the figure's
    for task_name in args.tasks:
        classes = task_classes(real, task_name)
        sub = subtask(real, classes)
        tested = int((torch.bincount(sub["labels"]) - POOL).clamp(min=0).sum())
        title = f"{task_name} ({len(classes)} classes, {len(sub['labels'])} images, {tested} of them the test set)"
        for tuned in {"defaults": [False], "tuned": [True], "both": [False, True]}[args.block]:
            name = "tuned on the dev folds" if tuned else "published defaults"
            cache.pending = []
            results = block(cache, sub, task_name, args.rows, tuned)
            if cache.pending:  # --finished: rows with a unit still to run (resume: the command without --finished)
                sections.append(f"**{title}, {name}**: not finished yet: " +
                                ", ".join(f"`{row}`" for row in cache.pending))
            if not results:
                continue
            everything[f"{task_name} {name}"], blocks[task_name, tuned] = results, results
            if not cache.pending:
                whole[task_name, tuned] = results
            sections.append(markdown_block(results, f"{title}, {name}", tuned))
            if "hegraph" in results:
                sections.append(markdown_differences(results, "hegraph", f"{task_name}, {name}"))
    text = "\n\n".join([markdown_summary(blocks), *sections])
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "real_features.md").write_text(text + "\n")
        (args.out / "real_features.json").write_text(json.dumps(everything, indent=1))
        if whole:
            plot(whole, args.out / "real_features.png", real["backbone"])
