"""
train.py: train HeGraphAdapter, or a baseline, on cached CLIP features and report honest test accuracy.

    python train.py --dataset dtd --shots 16                     # extract features if needed, train, evaluate
    python train.py --features my_feats.pt --shots 4 --method tip-f
    python train.py --dataset dtd --shots 4 --method taskres --search-val   # its knobs tuned on validation images

A run is a straight line: load the features, plan the run from the flags, then for each seed build the K-shot
task, build the model, train it (or search its knobs on the validation subset), evaluate it, and record. The
training set is the first K columns of the features file's fewshot[seed]; the cache holds one key per image (the
mean of its stored views) and each epoch draws one stored view per image. train() is given the training views,
labels, recipe and seed, nothing else, so no epoch or setting can be chosen on test images; --search-val scores
its grid on the min(K, 4)-shot validation subset only. The number reported is the test accuracy after the last
epoch, as mean and standard deviation (n - 1) over the seeds. Every method is one row of methods.METHODS.
"""

import argparse
import dataclasses
import inspect
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoints import classnames_sha256, load_checkpoints, load_state, other_runs, save_checkpoint, saved_config
from cli import Parser, dataset_arg, guarded, number_arg, path_arg, resolve_device
from extract_features import add_extraction_args, backbone_name, extract_from_args
from features_file import check_output, features_path, load_features, write_atomic
from fewshot_data import VAL_SHOTS, DataError, dataset_folder, dataset_name
from hegraphadapter import normalize
from methods import METHODS, ROW_FIELDS, WARMUP_LR, Recipe, grid

SHIFT_DATASETS = ("imagenetv2", "imagenet-sketch", "imagenet-adversarial", "imagenet-rendition")


# -----------------------------------------------------------------------------
# features file -> one seed's few-shot task

@dataclass
class Task:
    """Everything one seed's run needs, on one device, in float32."""
    pos_text: torch.Tensor           # [C, d] positive text features
    neg_text: torch.Tensor | None    # [C, d] negative text features, None without negatives
    train_views: torch.Tensor        # [V, n, d] the stored views of the n = C*K few-shot images
    train_labels: torch.Tensor       # [n]
    cache_feats: torch.Tensor        # [n, d] one cache key per image: the mean of its views
    val: tuple | None                # (features [m, d], labels [m]) of the min(K, 4)-shot val subset
    test: tuple                      # (features [T, d], labels [T])
    logit_scale: float

    @property
    def cache_labels(self):
        """The cache's labels: its images are the training images."""
        return self.train_labels


def make_task(data, seed, shots, device, negatives=True):
    """The K-shot task of one seed: few-shot views and cache, val subset, test set, text features."""
    if "fewshot" not in data or "train" not in data:
        raise DataError(f"the features of {data.get('dataset')!r} have no training split (a test-only set?)")
    if seed not in data["fewshot"]:
        raise DataError(f"the features file has no few-shot subset for seed {seed} (it has seeds "
                        f"{sorted(data['fewshot'])}); run with those --seeds, or extract features with --seeds "
                        f"{seed} (--overwrite replaces the file)")
    subset = data["fewshot"][seed].long()                                     # [C, max_shots]
    if shots > subset.shape[1]:
        raise DataError(f"--shots {shots} is above {subset.shape[1]}, the max-shots of the features file; "
                        f"extract features with --max-shots {shots} or more (--overwrite replaces the file)")
    if negatives and "negative" not in data["text"]:
        raise DataError("the features file has no negative text features: run with --no-negatives")
    f32 = lambda t: t.to(device=device, dtype=torch.float32)
    rows = subset[:, :shots].flatten()                                        # [C*K], class-major
    views = f32(data["train"]["features"][:, rows])                           # [V, C*K, d]
    val = None
    if "val" in data and "val_fewshot" in data and seed in data["val_fewshot"]:
        val_rows = data["val_fewshot"][seed][:, :min(shots, VAL_SHOTS)].long().flatten()
        val = (f32(data["val"]["features"][val_rows]), data["val"]["labels"][val_rows].to(device, torch.long))
    return Task(
        pos_text=f32(data["text"]["positive"]),
        neg_text=f32(data["text"]["negative"]) if negatives else None,
        train_views=views,
        train_labels=data["train"]["labels"][rows].to(device, torch.long),
        cache_feats=normalize(views.mean(0)),
        val=val,
        test=(f32(data["test"]["features"]), data["test"]["labels"].to(device, torch.long)),
        logit_scale=float(data["logit_scale"]),
    )


def build(method, task, config):
    """The method's model for this task, built alike for every row: its constructor takes the task tensors it
    names (pos_text, neg_text, cache_feats, cache_labels), then config and CLIP's logit scale. The parameters
    the row freezes keep their initial value."""
    takes = [p.name for p in inspect.signature(method.model).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    model = method.model(*(getattr(task, name) for name in takes), config=config, logit_scale=task.logit_scale)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(method.frozen))
    return model


def tunable_parameters(model):
    """The number of parameters training changes."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -----------------------------------------------------------------------------
# training: it sees the training views, their labels, the recipe and the seed, nothing else

def schedule(step, warmup_steps, total_steps, lr):
    """Learning rate at a step: warm-up rising linearly from WARMUP_LR, then cosine decay to 0."""
    if step < warmup_steps:
        return WARMUP_LR + (lr - WARMUP_LR) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * lr * (1 + math.cos(math.pi * progress))


def make_optimizer(params, recipe):
    """The recipe's optimizer over params."""
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, eps=recipe.eps, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, eps=recipe.eps, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)


class Diverged(DataError):
    """The loss became NaN or infinite."""


def train(model, views, labels, recipe, seed, desc=""):
    """Gradient steps on the model's tunable parameters; returns {"epoch_seconds": s} (0 with nothing to do).

    views [V, n, d], labels [n]: each epoch draws one stored view per training image, in a shuffled order,
    both from a generator seeded by `seed`. With leave_one_out an image's own cache key (its row in the cache)
    is left out of its cache logits, so the cache loss sees the cache as a test image does. A non-finite loss
    stops training; it is checked once per epoch, not at every step, to spare a GPU sync.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or recipe.epochs == 0:
        return {"epoch_seconds": 0.0}
    n = labels.shape[0]
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    optimizer = make_optimizer(params, recipe)
    warmup = steps_per_epoch if recipe.warmup else 0
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, warmup, total, recipe.lr) / recipe.lr)
    gen = torch.Generator().manual_seed(seed)                                # shuffles and view draws
    first_bad = torch.tensor(-1, device=views.device)                        # first step with a bad loss
    model.train()
    start, step = time.perf_counter(), 0
    with tqdm(total=recipe.epochs, desc=desc, leave=False, dynamic_ncols=True, disable=None) as bar:
        for _ in range(recipe.epochs):
            view = torch.randint(views.shape[0], (n,), generator=gen).to(views.device)
            order = torch.randperm(n, generator=gen).to(views.device)
            for batch in order.split(recipe.batch_size):
                extra = {"exclude": batch} if recipe.leave_one_out else {}
                loss = model.loss(views[view[batch], batch], labels[batch], **extra)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sched.step()
                step += 1
            if (bad := first_bad.item()) >= 0:
                raise Diverged(f"training diverged at seed {seed}, epoch {bad // steps_per_epoch + 1}, step "
                               f"{bad % steps_per_epoch + 1}: the loss is not finite; lower --lr (now {recipe.lr:g})")
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update()
    model.eval()
    return {"epoch_seconds": (time.perf_counter() - start) / recipe.epochs}


def fit(method, model, task, recipe, seed):
    """Fit the model as its row says: its own fit (the linear probe's, which searches C on the validation
    subset as published), gradient steps on the training views, or nothing. Returns an info dict."""
    if method.fit is not None:
        return method.fit(model, task, seed)
    if recipe is None:
        return {}
    return train(model, task.train_views, task.train_labels, recipe, seed, desc=f"seed {seed}")


# -----------------------------------------------------------------------------
# evaluation and the knob search on the validation subset

@torch.no_grad()
def accuracy(model, feats, labels, classes=None, batch_size=4096):
    """Top-1 accuracy in percent of the model's prediction, in eval mode, in batches. classes [C'] (optional):
    predict among these columns only (an ImageNet shift set's classes); labels then index into them."""
    model.eval()
    correct = 0
    for f, y in zip(feats.split(batch_size), labels.split(batch_size)):
        logits = model(f) if classes is None else model(f)[:, classes]
        correct += (logits.argmax(1) == y.to(logits.device)).sum().item()
    return 100.0 * correct / max(1, labels.numel())


def fit_at(method, task, config, recipe, point, seed):
    """Build and fit the model at one grid point's training knobs (config fields, or the recipe's "lr").
    Returns (model, info)."""
    point = {k: v for k, v in point.items() if k not in method.post_hoc}
    recipe = recipe and dataclasses.replace(recipe, lr=point.pop("lr", recipe.lr))
    torch.manual_seed(seed)  # a random initialisation (CLIP-Adapter's) depends on the seed alone, not on the grid
    model = build(method, task, dataclasses.replace(config, **point))
    return model, fit(method, model, task, recipe, seed)


def with_post_hoc(method, task, model, point):
    """The trained model with the point's post-hoc knobs (a cache's α, γ) set, its parameters unchanged."""
    after = {k: v for k, v in point.items() if k in method.post_hoc}
    if not after:
        return model.eval()
    tuned = build(method, task, dataclasses.replace(model.config, **after))
    tuned.load_state_dict(model.state_dict())
    return tuned.eval()


def score_grid(method, task, config, recipe, points, seed, feats, labels):
    """Every grid point's accuracy on (feats, labels), which must be validation images, never the test split.
    Points that differ only in post-hoc knobs share one training. Returns the best point's (model, info), the
    first of equal scores, and the [(point, accuracy)] of all, in grid order."""
    groups = {}  # training knobs -> grid indices, in grid order
    for i, point in enumerate(points):
        groups.setdefault(tuple((k, v) for k, v in point.items() if k not in method.post_hoc), []).append(i)
    scores, best = [None] * len(points), None
    for indices in groups.values():
        trained, info = fit_at(method, task, config, recipe, points[indices[0]], seed)
        for i in indices:
            model = with_post_hoc(method, task, trained, points[i])
            scores[i] = accuracy(model, feats, labels)
            if best is None or (scores[i], -i) > (best[0], -best[1]):
                best = (scores[i], i, model, info)
    return best[2], best[3], list(zip(points, scores))


def search(method, task, config, recipe, points, seed):
    """--search-val: the grid scored on the min(K, 4)-shot validation subset; returns the best point's model,
    its fit info and {"chosen": point, "val_accuracy": %} for the record."""
    model, info, scores = score_grid(method, task, config, recipe, points, seed, *task.val)
    chosen, val_accuracy = max(scores, key=lambda s: s[1])   # max keeps the first of equal scores
    return model, info, {"chosen": chosen, "val_accuracy": val_accuracy}


# -----------------------------------------------------------------------------
# one run: plan, then seed by seed

@dataclass(frozen=True)
class Plan:
    """One run, resolved from the flags, the features and any checkpoints: what the record says was used."""
    method: str              # its row in METHODS
    shots: int               # K
    no_negatives: bool       # --no-negatives
    dataset: str             # the features file's dataset
    recipe: Recipe | None    # the effective recipe (flags applied); None: nothing trained by gradient steps
    config: object           # the model's config: the row's published one with the config flags applied
    grid: tuple = ()         # the knob settings --search-val tries; () without it


def config_flags():
    """Every field of every method's config, but those a row fixes: name -> (type, [methods it configures])."""
    flags = {}
    for name, method in METHODS.items():
        for f in dataclasses.fields(method.config("")):
            if f.name not in ROW_FIELDS:
                flags.setdefault(f.name, (f.type, []))[1].append(name)
    return flags


def config_from_flags(name, dataset, args):
    """The row's published config for this dataset with the config flags given; a flag that sets nothing of
    this method is refused rather than silently ignored."""
    config = METHODS[name].config(dataset)
    given = {f: getattr(args, f) for f in config_flags() if getattr(args, f, None) is not None}
    fields = {f.name for f in dataclasses.fields(config)}
    for flag in sorted(set(given) - fields):
        owners = ", ".join(config_flags()[flag][1])
        raise DataError(f"--{flag.replace('_', '-')} sets nothing of {name} (it configures {owners}); drop it")
    return dataclasses.replace(config, **given)


def effective_recipe(method, dataset, shots, args):
    """The method's recipe for this dataset and K, with --epochs, --lr, --batch-size applied; None if it
    has nothing to train by gradient steps."""
    if method.recipe is None:
        return None
    overrides = {k: getattr(args, k) for k in ("epochs", "lr", "batch_size") if getattr(args, k) is not None}
    return dataclasses.replace(method.recipe(dataset, shots), **overrides)


def make_plan(args, data, run_id=None):
    """What the run does; run_id: the identity of the checkpoints --eval-only evaluates, whose method, K and
    negatives it takes."""
    dataset = data["dataset"]
    name = run_id["method"] if run_id else args.method or "hegraph"
    shots = run_id["shots"] if run_id else args.shots or 16
    no_negatives = run_id["no_negatives"] if run_id else args.no_negatives
    method = METHODS[name]
    if method.negatives == "required" and no_negatives:
        raise DataError(f"{name} aggregates only the negative nodes, so it cannot run with --no-negatives")
    recipe = None if run_id else effective_recipe(method, dataset, shots, args)
    points = check_search(args, name, data, recipe) if args.search_val else []
    return Plan(name, shots, no_negatives, dataset, recipe, config_from_flags(name, dataset, args), tuple(points))


def check_search(args, name, data, recipe):
    """The grid --search-val tries, or one line why it cannot run."""
    if args.eval_only:
        raise DataError("--search-val trains and --eval-only evaluates saved checkpoints; drop one of them")
    points = grid(METHODS[name], data["dataset"], recipe)
    if not points:
        why = "its fit searches C on the validation subset anyway" if METHODS[name].fit else "it trains nothing"
        raise DataError(f"--search-val tunes a method's knobs, and {name} has none ({why}); drop it")
    if "val_fewshot" not in data:
        raise DataError(f"--search-val needs a validation split, and the features of {data['dataset']!r} have none")
    searched = [k for k in points[0] if (getattr(args, k, None) if k != "lr" else args.lr) is not None]
    if searched:
        raise DataError(f"--{searched[0].replace('_', '-')} is a knob --search-val tunes for {name}; drop one of them")
    return points


def run_id_of(plan, data, task):
    """What makes seeds one run (and checkpoints one folder): method, K, flags and recipe on the same features."""
    return dict(method=plan.method, shots=plan.shots, no_negatives=plan.no_negatives, dataset=plan.dataset,
                backbone=data["backbone"], num_classes=task.pos_text.shape[0], dim=task.pos_text.shape[1],
                classnames_sha256=classnames_sha256(data["classnames"]),
                config=dataclasses.asdict(plan.config), search_val=bool(plan.grid),
                recipe=plan.recipe and dataclasses.asdict(plan.recipe))


def model_for_seed(plan, task, seed, ckpt=None, folder=None):
    """The seed's model: loaded from its checkpoint, searched on the validation subset, or built and fit.
    Returns (model, info, search record or None)."""
    method = METHODS[plan.method]
    if ckpt is not None:
        model = build(method, task, saved_config(plan.config, ckpt, folder))
        return load_state(model, ckpt, Path(folder) / f"seed{seed}.pt").eval(), {}, None
    if plan.grid:
        return search(method, task, plan.config, plan.recipe, list(plan.grid), seed)
    model, info = fit_at(method, task, plan.config, plan.recipe, {}, seed)
    return model.eval(), info, None


def evaluate(model, task, shifts, device):
    """Test accuracy %, and on each ImageNet shift set among its own classes."""
    scores = {"test": accuracy(model, *task.test)}
    for name, shift in shifts.items():
        feats = shift["test"]["features"].to(device, torch.float32)
        scores[name] = accuracy(model, feats, shift["test"]["labels"], classes=shift["class_map"].to(device))
    return scores


def new_record(plan, data, args, device, shifts):
    """The results dict before any seed: what the run uses."""
    return {"method": plan.method, "dataset": plan.dataset, "backbone": data["backbone"], "shots": plan.shots,
            "seeds": {}, "epoch_seconds": {}, "train_seconds": {}, "model_config": {}, "fit": {}, "search": {},
            "shift": {name: {} for name in shifts}, "recipe": plan.recipe and dataclasses.asdict(plan.recipe),
            "no_negatives": plan.no_negatives, "search_val": bool(plan.grid), "grid": list(plan.grid),
            "device": str(device), "features": str(args.features) if args.features else None}


def record_seed(results, seed, model, info, searched, scores, seconds):
    results["params"] = tunable_parameters(model)
    results["seeds"][seed] = scores.pop("test")
    for name, acc in scores.items():
        results["shift"][name][seed] = acc
    results["train_seconds"][seed] = seconds
    results["epoch_seconds"][seed] = info.pop("epoch_seconds", None)     # None: no epochs (tip, the probe)
    results["model_config"][seed] = dataclasses.asdict(model.config)
    results["fit"][seed] = info
    if searched is not None:
        results["search"][seed] = searched


def summarise(results):
    """Mean and sample standard deviation (n - 1) of the seeds' test accuracies."""
    accs = torch.tensor(list(results["seeds"].values()), dtype=torch.float64)
    results.update(test_accuracy=accs.mean().item(), std=accs.std(correction=1).item() if len(accs) > 1 else 0.0)
    return results


def run(args):
    """Train and evaluate one method over the seeds; returns the results dict (also written to --out)."""
    device = prepare(args)
    data = load_features(args.features) if args.features else features_for(args, args.dataset)
    check_dataset(args, data)
    ckpts, run_id = (load_checkpoints(args.load, args.seeds, data, args.method, args.shots, args.no_negatives)
                     if args.eval_only else (None, None))
    plan = make_plan(args, data, run_id)
    shifts = shift_sets(args, data)
    results, trained = new_record(plan, data, args, device, shifts), {}
    negatives = not plan.no_negatives and bool(METHODS[plan.method].negatives)
    for seed in args.seeds:
        torch.manual_seed(seed)
        task = make_task(data, seed, plan.shots, device, negatives)
        if seed == args.seeds[0]:
            stale = check_room(args, plan, data, task) if not ckpts else []
        start = time.perf_counter()
        model, info, searched = model_for_seed(plan, task, seed, ckpts and ckpts[seed], args.load)
        seconds = 0.0 if ckpts else time.perf_counter() - start
        record_seed(results, seed, model, info, searched, evaluate(model, task, shifts, device), seconds)
        trained[seed] = (model, run_id_of(plan, data, task))
    summarise(results)
    print_table(results)
    write_outputs(args, results, {} if ckpts else trained, stale)
    return results


def write_outputs(args, results, trained, stale):
    """--save's checkpoints and --out's results, once the numbers are printed: a write that still fails (a disk
    filled meanwhile) loses nothing that was measured, and says where it could not write."""
    try:
        for seed, (model, run_id) in trained.items():
            if args.save:
                save_checkpoint(args.save, seed, run_id, model, stale)
                stale = []
        if args.out:
            write_atomic(args.out, lambda f: f.write(json.dumps(results, indent=2).encode()))
    except OSError as e:
        raise DataError(f"the results are printed above, but {e.filename or args.out or args.save} could not be "
                        f"written ({e.strerror}); free some space or choose another --out / --save") from None


def print_table(results):
    """Per-seed test accuracy, mean and standard deviation, seconds per epoch, tunable parameters."""
    print(f"\n{results['method']} on {results['dataset']} ({results['backbone']}), {results['shots']} shots, "
          f"{results['params']:,} tunable parameters")
    print(f"{'seed':>6} {'test acc %':>11} {'s/epoch':>8}" + "".join(f" {n:>21}" for n in results["shift"]))
    for seed, acc in results["seeds"].items():
        shift = "".join(f" {results['shift'][n][seed]:>21.2f}" for n in results["shift"])
        epoch = results["epoch_seconds"][seed]
        print(f"{seed:>6} {acc:>11.2f} {'–' if epoch is None else f'{epoch:.3f}':>8}{shift}")
    print(f"{'mean':>6} {results['test_accuracy']:>11.2f}  ± {results['std']:.2f} (std over seeds)")


# -----------------------------------------------------------------------------
# files: features (extracted on demand) and outputs

def prepare(args):
    """Before any file is read: determinism, the device, and outputs that can be written."""
    device = resolve_device(args.device)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)   # same seed, same device -> same accuracy
    check_outputs(args)
    shots = args.shots or 16
    if not args.features and not args.eval_only and shots > args.max_shots:
        raise DataError(f"--shots {shots} is above --max-shots {args.max_shots}, the largest K extracted; "
                        f"pass --max-shots {shots}")
    return device


def features_for(args, dataset, like=None):
    """The features of a dataset in --features-dir, extracted first or reused when they were made with the
    settings asked for (extract_features checks, also when the dataset folder is absent). like: a features
    file's dict whose CLIP to use instead of the one the flags name."""
    return load_features(extract_from_args(args, dataset, like))


def check_dataset(args, data):
    if args.features and args.dataset and dataset_name(args.dataset) != data["dataset"]:
        raise DataError(f"--features {args.features} holds {data['dataset']!r}, not --dataset {args.dataset!r}; drop "
                        f"--dataset or pass that dataset's features")


def shift_sets(args, data):
    """The --eval-datasets features, found by the main features' backbone."""
    shifts = {name: features_for(args, name, like=data) for name in args.eval_datasets}
    C = len(data["classnames"])
    for name, shift in shifts.items():
        if "class_map" not in shift:
            raise DataError(f"{name}: its features file has no class_map; re-extract it")
        if int(shift["class_map"].max()) >= C:
            raise DataError(f"{name}: its class_map names class {int(shift['class_map'].max())}, and the features the "
                            f"model is trained on have {C} classes; evaluate a model of the full ImageNet on it")
    return shifts


def run_inputs(args):
    """Every file or folder a run reads, {what: path}: no output may be written over (or into) one of them."""
    return {"the --features file": args.features, "the --load folder": args.load,
            "the --clip-checkpoint": args.clip_checkpoint,
            "the --prompts file": args.prompts if isinstance(args.prompts, Path) else None,
            "the dataset folder": args.dataset and dataset_folder(args.dataset, args.root),
            "the features file": None if args.features or not args.dataset else features_file_of(args)}


def features_file_of(args):
    """The features file --dataset extracts or reuses; None while its CLIP cannot be named (a checkpoint that is
    not there yet): the extraction then says why, in its turn."""
    try:
        return features_path(args.features_dir, dataset_name(args.dataset), backbone_name(args))
    except DataError:
        return None


def check_outputs(args):
    """Fail now, before any work, if --out or --save would destroy an input or cannot be written (check_output)."""
    inputs = run_inputs(args)
    checkpoints = {f"the --save checkpoint of seed {s}": Path(args.save) / f"seed{s}.pt" for s in args.seeds} \
        if args.save and not args.eval_only else {}
    if args.out:
        check_output("--out", args.out, inputs | checkpoints)
    if checkpoints:
        check_output("--save", args.save, inputs, folder=True)
    for path in checkpoints.values():
        check_output("--save", path, inputs | {"the --out file": args.out})


def check_room(args, plan, data, task):
    """Before training: room on the disk for --save's checkpoints (the first seed's model, built untrained, times
    the seeds); returns the other run's checkpoints there that --overwrite replaces."""
    if not args.save:
        return []
    method = METHODS[plan.method]
    state = build(method, task, plan.config).state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values()) * len(args.seeds) + (1 << 20)
    check_output("--save", args.save, run_inputs(args), folder=True, needed_bytes=size)
    return other_runs(args.save, run_id_of(plan, data, task), args.overwrite)


# -----------------------------------------------------------------------------
# command line

def add_config_flags(parser):
    """One flag per setting of the methods' configs (default: the method's published value for the dataset)."""
    g = parser.add_argument_group("method settings (default: each method's published value; see methods.py)")
    for name, (kind, owners) in config_flags().items():
        where = ", ".join(owners) if len(owners) < 4 else f"{owners[0]}, ... ({len(owners)} methods)"
        number = kind in (int, float)  # every number has its row in RANGES: checked here, where it enters
        extra = ({"action": argparse.BooleanOptionalAction} if kind is bool else
                 {"type": number_arg(name, kind) if number else kind})
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"{name} of {where}", **extra)


def parse_args(argv=None):
    methods = "\n".join(f"  {name:<14} {m.about}" for name, m in METHODS.items())
    p = Parser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=f"methods:\n{methods}")
    p.add_argument("--dataset", type=dataset_arg, help="a dataset key, e.g. dtd, or a folder holding one subfolder "
                   "of images per class (docs/datasets.md); optional with --features")
    p.add_argument("--shots", type=number_arg("shots", int), help="K, training images per class (default 16)")
    p.add_argument("--method", choices=list(METHODS), help="default hegraph (the full model); list below")
    p.add_argument("--no-negatives", action="store_true", help="run without the negative text nodes")
    p.add_argument("--features", type=path_arg, help="train on this features file instead of extracting one")
    add_extraction_args(p)
    g = p.add_argument_group("recipe (default: each method's published one; see methods.py)")
    g.add_argument("--epochs", type=number_arg("epochs", int), help="training epochs; 0 evaluates the model as built")
    g.add_argument("--lr", type=number_arg("lr"), help="peak learning rate")
    g.add_argument("--batch-size", type=number_arg("batch_size", int), help="training images per step")
    g.add_argument("--search-val", action="store_true", help="tune the method's knobs (methods.py, at most 12 "
                   "settings) on the min(K, 4)-shot validation subset, never on test images")
    add_config_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", type=path_arg, help="write the results json here")
    g.add_argument("--save", type=path_arg, help="write the learned parameters and configuration to DIR/seed<N>.pt")
    g.add_argument("--eval-only", action="store_true", help="evaluate checkpoints from --load, no training")
    g.add_argument("--load", type=path_arg, help="checkpoint folder written by --save (with --eval-only)")
    g.add_argument("--eval-datasets", nargs="+", default=[], choices=SHIFT_DATASETS,
                   help="also evaluate on these ImageNet shift sets, restricted to their classes")
    args = p.parse_args(argv)
    if args.dataset is None and args.features is None:
        p.error("give --dataset (features are extracted if needed) or --features FILE")
    if args.dataset in SHIFT_DATASETS:
        p.error(f"--dataset {args.dataset} is a test-only set: train on imagenet and pass "
                f"--eval-datasets {args.dataset}")
    if args.eval_only != bool(args.load):
        p.error("--eval-only and --load DIR go together")
    return args


def main(argv=None):
    guarded("train.py", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
