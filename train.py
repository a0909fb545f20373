"""
train.py: train HeGraphAdapter, or a baseline, on cached CLIP features and report honest test accuracy.

    python train.py --dataset dtd --shots 16                     # extract features if needed, train, evaluate
    python train.py --features my_feats.pt --shots 4 --method tip-f

For each seed the K-shot training set is the first K columns of the features file's fewshot[seed]; the
cache holds one key per training image (the mean of its stored views) and each epoch draws one stored
view per image. Nothing is selected on the test split: the number reported is the test accuracy after
the last epoch, as mean and standard deviation over the seeds. --search-val may tune α and γ on the
min(K, 4)-shot validation subset, never on test images. Every method is one row of METHODS.
"""

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from baselines import (CLIPAdapter, CLIPAdapterConfig, GraphAdapter, GraphAdapterConfig, LinearProbe,
                       LinearProbeConfig, NoConfig, TaskRes, TaskResConfig, TipAdapter, TipConfig, ZeroShot,
                       fit_linear_probe)
from cli import Parser, fail, path_arg, resolve_device
from extract_features import add_extraction_args, extract_from_args
from features_file import load_features, load_torch_file, write_atomic
from fewshot_data import DATASETS, DataError
from hegraphadapter import HeGraphAdapter, HeGraphConfig, normalize

SHIFT_DATASETS = ("imagenetv2", "imagenet-sketch", "imagenet-adversarial", "imagenet-rendition")
WARMUP_LR = 1e-5  # the warm-up epoch starts from this learning rate


# -----------------------------------------------------------------------------
# recipes: how each method trains, per dataset and K

@dataclass(frozen=True)
class Recipe:
    epochs: int                  # training epochs (0: evaluate the model as built)
    lr: float                    # peak learning rate
    batch_size: int = 256        # training images per step
    optimizer: str = "adamw"     # "adamw"; "adam" (L2 added to the gradient, as Dassl's); "sgd" (momentum 0.9)
    weight_decay: float = 0.01   # AdamW's decoupled decay, or the L2 of adam / sgd
    eps: float = 1e-8            # Adam's epsilon
    warmup: bool = True          # one epoch rising linearly from WARMUP_LR, then cosine to 0 (per step)
    leave_one_out: bool = False  # a training image's own cache key is left out of its cache logits


def paper_recipe(dataset, shots):
    """HeGraphAdapter (paper 4.1): AdamW, 100 epochs for EuroSAT, DTD, FGVCAircraft, else 30; lr 0.01 for
    FGVCAircraft, else 0.001. Leave-one-out: the training images are the cache's own."""
    epochs = 100 if dataset in ("eurosat", "dtd", "fgvc_aircraft") else 30
    return Recipe(epochs, 1e-2 if dataset == "fgvc_aircraft" else 1e-3, leave_one_out=True)


def tip_f_recipe(dataset, shots):
    """Tip-Adapter-F's configs/<dataset>.yaml: AdamW lr 0.001, eps 1e-4, 20 epochs (EuroSAT 100), batch 256,
    cosine per step, no warm-up; trained on the views against their own keys."""
    return Recipe(100 if dataset == "eurosat" else 20, 1e-3, eps=1e-4, warmup=False)


def taskres_recipe(dataset, shots):
    """TaskRes's configs adam_lr2e-3_B256_ep{100,200}.yaml: Adam (L2 5e-4), lr 0.002 (ImageNet 0.0002),
    100 epochs up to 4 shots, 200 from 8, batch 256, one warm-up epoch, cosine."""
    return Recipe(100 if shots <= 4 else 200, 2e-4 if dataset == "imagenet" else 2e-3, optimizer="adam",
                  weight_decay=5e-4)


def coop_recipe(dataset, shots):
    """CoOp's SGD recipe (lr 0.002, momentum 0.9, L2 5e-4, batch 32, one warm-up epoch, cosine), which
    CLIP-Adapter's README points to, with the 200 epochs the Tip-Adapter paper reports for CLIP-Adapter."""
    return Recipe(200, 2e-3, batch_size=32, optimizer="sgd", weight_decay=5e-4)


# -----------------------------------------------------------------------------
# features file -> one few-shot task

@dataclass
class Task:
    """Everything one run needs, on one device, in float32."""
    pos_text: torch.Tensor           # [C, d] positive text features
    neg_text: torch.Tensor | None    # [C, d] negative text features, None without negatives
    train_views: torch.Tensor        # [V, n, d] the stored views of the n = C*K few-shot images
    train_labels: torch.Tensor       # [n]
    cache_feats: torch.Tensor        # [n, d] one cache key per image: the mean of its views
    val: tuple | None                # (features [m, d], labels [m]) of the min(K, 4)-shot val subset
    test: tuple                      # (features [T, d], labels [T])
    logit_scale: float


def make_task(data, seed, shots, device, negatives=True):
    """The K-shot task of one seed: few-shot views and cache, val subset, test set, text features."""
    if "fewshot" not in data or "train" not in data:
        raise DataError(f"the features of {data.get('dataset')!r} have no training split (a test-only set?)")
    if seed not in data["fewshot"]:
        raise DataError(f"the features file has no few-shot subset for seed {seed} (it has seeds "
                        f"{sorted(data['fewshot'])}); run with those --seeds, or extract features with --seeds "
                        f"{seed} (--overwrite replaces the file)")
    subset = data["fewshot"][seed]                                            # [C, max_shots]
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
        val_rows = data["val_fewshot"][seed][:, :min(shots, 4)].flatten()
        val = (f32(data["val"]["features"][val_rows]), data["val"]["labels"][val_rows].to(device))
    return Task(
        pos_text=f32(data["text"]["positive"]),
        neg_text=f32(data["text"]["negative"]) if negatives else None,
        train_views=views,
        train_labels=data["train"]["labels"][rows].to(device),
        cache_feats=normalize(views.mean(0)),
        val=val,
        test=(f32(data["test"]["features"]), data["test"]["labels"].to(device)),
        logit_scale=float(data["logit_scale"]),
    )


# -----------------------------------------------------------------------------
# the methods: one row each

@dataclass(frozen=True)
class Method:
    """One row of METHODS: how a method builds its model, configures it and trains."""
    model: Callable                  # (task, config) -> nn.Module with forward() and loss()
    config: Callable                 # (args, dataset) -> the model's frozen config
    about: str                       # one line for --help
    recipe: Callable | None = None   # (dataset, shots) -> Recipe; None: nothing to train by gradient steps
    fit: Callable | None = None      # (model, task, seed) -> info dict, instead of gradient steps
    negatives: bool = False          # reads the negative text nodes (unless --no-negatives)
    cache: bool = False              # predicts logits_t + α logits_v: --search-val may tune α and γ


def hegraph(variant, about, learn_projections=True):
    """A HeGraphAdapter variant; learn_projections=False keeps every W at zero (only the biases learn)."""
    def model(task, config):
        m = HeGraphAdapter(task.pos_text, task.neg_text, task.cache_feats, task.train_labels, config=config,
                           logit_scale=task.logit_scale)
        for name, p in m.named_parameters():
            p.requires_grad_(learn_projections or not name.startswith("W_"))
        return m

    def config(args, dataset):
        if variant == "tn" and args.no_negatives:
            raise DataError("hegraph-tn aggregates only the negative nodes, so it cannot run with --no-negatives")
        fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(HeGraphConfig) if f.name != "variant"}
        return HeGraphConfig(variant=variant, **fields)
    return Method(model, config, about, paper_recipe, negatives=variant != "tp", cache=variant == "full")


def tip(learn_keys, about):
    """Tip-Adapter, or Tip-Adapter-F with learn_keys; α and γ from --alpha and --gamma."""
    return Method(lambda task, cfg: TipAdapter(task.pos_text, task.cache_feats, task.train_labels, config=cfg,
                                               logit_scale=task.logit_scale),
                  lambda args, dataset: TipConfig(alpha=args.alpha, gamma=args.gamma, learn_keys=learn_keys),
                  about, tip_f_recipe if learn_keys else None, cache=True)


def on_text(cls, config, about, recipe=None, fit=None):
    """A baseline built from the text features alone: cls(pos_text, config=..., logit_scale=...)."""
    return Method(lambda task, cfg: cls(task.pos_text, config=cfg, logit_scale=task.logit_scale), config, about,
                  recipe, fit)


def fit_probe(model, task, seed):
    """The linear probe: L-BFGS on view 0 (CLIP's own preprocessing) of the images, C searched on val."""
    return {"inverse_l2": fit_linear_probe(model, task.train_views[0], task.train_labels, task.val)}


METHODS = {
    "zeroshot": on_text(ZeroShot, lambda args, dataset: NoConfig(),
                        "CLIP zero-shot with the positive prompts (the paper's Base)"),
    "linear-probe": on_text(LinearProbe, lambda args, dataset: LinearProbeConfig(),
                            "CLIP's linear probe: L2 logistic regression, C searched on val", fit=fit_probe),
    "tip": tip(False, "Tip-Adapter, training-free"),
    "tip-f": tip(True, "Tip-Adapter-F: the cache keys are learned"),
    "taskres": on_text(TaskRes, lambda args, dataset: TaskResConfig(scale=1.0 if dataset == "oxford_flowers" else 0.5),
                       "TaskRes: a learned per-class residual on the text classifier", taskres_recipe),
    "clip-adapter": on_text(CLIPAdapter, lambda args, dataset: CLIPAdapterConfig(),
                            "CLIP-Adapter: a residual bottleneck MLP on the image feature", coop_recipe),
    "graphadapter": Method(lambda task, cfg: GraphAdapter(task.pos_text, task.cache_feats, task.train_labels,
                                                          config=cfg, logit_scale=task.logit_scale),
                           lambda args, dataset: GraphAdapterConfig(),
                           "GraphAdapter: textual and visual knowledge graphs refine the text classifier",
                           taskres_recipe),
    "hegraph": hegraph("full", "HeGraphAdapter, the full model"),
    "hegraph-t": hegraph("t", "HeGraphAdapter(T): the text classifier only"),
    "hegraph-tn": hegraph("tn", "HeGraphAdapter(T-N): only the negative nodes feed P'"),
    "hegraph-tp": hegraph("tp", "HeGraphAdapter(T-P): no negative nodes"),
    "hegraph-bias": hegraph("full", "ablation: the full model with every W kept at zero, only the biases learn",
                            learn_projections=False),
}


def tunable_parameters(model):
    """The number of parameters training changes."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -----------------------------------------------------------------------------
# training and evaluation

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


def train(model, task, recipe, seed, desc=""):
    """Gradient steps on the model's tunable parameters; returns {"epoch_seconds": s} (0 with nothing to do).

    Each epoch draws one stored view per training image, in a shuffled order. With leave_one_out an image's
    own cache key is left out of its cache logits, so the cache loss sees the cache as a test image does.
    A non-finite loss stops training; it is checked once per epoch, not at every step, to spare a GPU sync.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or recipe.epochs == 0:
        return {"epoch_seconds": 0.0}
    views, labels = task.train_views, task.train_labels                     # [V, n, d], [n]
    n = labels.shape[0]
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    optimizer = make_optimizer(params, recipe)
    warmup = steps_per_epoch if recipe.warmup else 0
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, warmup, total, recipe.lr) / recipe.lr)
    gen = torch.Generator().manual_seed(seed)                                # shuffles and view draws
    first_bad = torch.tensor(-1, device=views.device)                        # first step with a bad loss
    model.train()
    start = time.perf_counter()
    step = 0
    with tqdm(total=recipe.epochs, desc=desc, leave=False, dynamic_ncols=True) as bar:  # closed on errors too
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


@torch.no_grad()
def search_alpha_gamma(method, task, model):
    """Tip-Adapter's search of α and γ, on the validation subset only. Returns the model rebuilt with the
    best pair: configs are frozen, so the searched values are what the model and its record hold."""
    feats, labels = task.val
    best = (-1.0, model.config.alpha, model.config.gamma)
    state = model.state_dict()
    for gamma in (0.5, 1, 2, 3, 4, 5, 6, 7, 8, 10):
        candidate = method.model(task, dataclasses.replace(model.config, gamma=gamma))
        candidate.load_state_dict(state)
        logits_t, logits_v = candidate.eval().logits(feats)
        for alpha in torch.linspace(0.1, 5, 50).tolist():
            acc = ((logits_t + alpha * logits_v).argmax(1) == labels).float().mean().item()
            best = max(best, (acc, alpha, gamma))
    searched = method.model(task, dataclasses.replace(model.config, alpha=best[1], gamma=best[2]))
    searched.load_state_dict(state)
    return searched.eval()


# -----------------------------------------------------------------------------
# files: features (extracted on demand), checkpoints, results

def features_for(args, dataset, backbone=None):
    """The features of a dataset in --features-dir, extracted first or reused when they were made with the
    settings asked for (extract_features checks, also when the dataset folder is absent). backbone: look up
    this backbone's file instead of --backbone."""
    return load_features(extract_from_args(args, dataset, backbone))


def check_writable(path, folder=False):
    """Fail now, not after training, if `path` (a file, or a folder) cannot be written."""
    target = Path(path) if folder else Path(path).parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror}; choose another path") from None


def read_checkpoint(path):
    """A checkpoint written by --save, or one clear error."""
    ckpt = load_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or not {"run", "state_dict", "seed", "model_config"} <= set(ckpt):
        raise DataError(f"{path} is not a checkpoint written by train.py --save")
    return ckpt


def saved_config(configured, ckpt, folder):
    """The configuration a checkpoint's model was built with, as this code's config class; one clear error
    for a checkpoint of another version whose config has other fields: a field it lacks would silently take
    today's default (weight_scale changed from 1 to 0.1), not the value it was trained with."""
    fields, saved = {f.name for f in dataclasses.fields(configured)}, set(ckpt["model_config"])
    if saved != fields:
        differ = " and ".join(f"{what} {', '.join(sorted(names))}" for what, names in
                              (("lacks", fields - saved), ("has the unknown", saved - fields)) if names)
        raise DataError(f"the checkpoints in {folder} were written by another version of train.py: their model "
                        f"configuration {differ}; train again with --save {folder} --overwrite")
    return dataclasses.replace(configured, **ckpt["model_config"])


def checkpoint_files(folder):
    return sorted(Path(folder).glob("seed*.pt"))


def check_save_folder(args, run_id):
    """--save never mixes runs: seed files of another method or configuration are refused, or with
    --overwrite removed (once the first new checkpoint is written)."""
    others = [p for p in checkpoint_files(args.save) if read_checkpoint(p)["run"] != run_id]
    if others and not args.overwrite:
        theirs = read_checkpoint(others[0])["run"]
        raise DataError(f"{args.save} holds checkpoints of another run ({theirs['method']}, {theirs['shots']} "
                        f"shots on {theirs['dataset']}, or another configuration), e.g. {others[0].name}; choose "
                        f"another --save folder or pass --overwrite to replace them")
    return others


def load_checkpoints(args, data):
    """--eval-only: the checkpoints of args.seeds in --load, which must all be of one run on these features.
    The run's method and shots are taken from them; a conflicting --method or --shots is refused."""
    ckpts = {}
    for seed in args.seeds:
        path = Path(args.load) / f"seed{seed}.pt"
        if not path.is_file():
            raise DataError(f"no checkpoint {path} for seed {seed}: train with --save {args.load} first")
        ckpts[seed] = read_checkpoint(path)
    run_ids = {json.dumps(c["run"], sort_keys=True) for c in ckpts.values()}
    if len(run_ids) > 1:
        raise DataError(f"the checkpoints in {args.load} are of different runs (method, shots or configuration "
                        f"differ between seeds); evaluate them separately")
    run_id = next(iter(ckpts.values()))["run"]
    C, d = data["text"]["positive"].shape
    if (run_id["backbone"], run_id["num_classes"], run_id["dim"]) != (data["backbone"], C, d):
        raise DataError(f"the checkpoints in {args.load} are for backbone {run_id['backbone']} with "
                        f"{run_id['num_classes']} classes of size {run_id['dim']}, the features are "
                        f"{data['backbone']} with {C} classes of size {d}")
    for flag, key in (("method", "method"), ("shots", "shots")):
        given = getattr(args, flag)
        if given is not None and given != run_id[key]:
            raise DataError(f"--{flag} {given} conflicts with the checkpoints in {args.load}, which hold "
                            f"{key} {run_id[key]}; drop --{flag} to evaluate them")
    if args.no_negatives and not run_id["no_negatives"]:
        raise DataError(f"--no-negatives conflicts with the checkpoints in {args.load}, trained with negatives")
    args.method, args.shots, args.no_negatives = run_id["method"], run_id["shots"], run_id["no_negatives"]
    return ckpts


def effective_recipe(method, dataset, shots, args):
    """The method's recipe for this dataset and K, with --epochs, --lr, --batch-size applied; None if it
    has nothing to train by gradient steps."""
    if method.recipe is None:
        return None
    overrides = {k: getattr(args, k) for k in ("epochs", "lr", "batch_size") if getattr(args, k) is not None}
    return dataclasses.replace(method.recipe(dataset, shots), **overrides)


# -----------------------------------------------------------------------------
# one run

def run(args):
    """Train and evaluate one method over the seeds; returns the results dict (also written to --out)."""
    device = resolve_device(args.device)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)   # same seed, same device -> same accuracy
    if args.out:
        check_writable(args.out)
    if args.save:
        check_writable(args.save, folder=True)
    if not args.features and not args.eval_only and args.shots > args.max_shots:
        raise DataError(f"--shots {args.shots} is above --max-shots {args.max_shots}, the largest K extracted; "
                        f"pass --max-shots {args.shots}")

    data = load_features(args.features) if args.features else features_for(args, args.dataset)
    dataset = data["dataset"]
    if args.features and args.dataset and args.dataset != dataset:
        raise DataError(f"--features {args.features} holds {dataset!r}, not --dataset {args.dataset!r}; drop "
                        f"--dataset or pass that dataset's features")
    ckpts = load_checkpoints(args, data) if args.eval_only else None
    args.method, args.shots = args.method or "hegraph", args.shots or 16
    method = METHODS[args.method]
    recipe = None if args.eval_only else effective_recipe(method, dataset, args.shots, args)
    negatives = method.negatives and not args.no_negatives
    configured = method.config(args, dataset)   # the model's config from the flags; refuses what cannot run
    if args.search_val and not method.cache:
        raise DataError(f"--search-val tunes the α and γ of a cache, and {args.method} has none; drop it")
    if args.search_val and "val_fewshot" not in data:
        raise DataError(f"--search-val needs a validation split, and the features of {dataset!r} have none")
    shifts = {name: features_for(args, name, backbone=data["backbone"]) for name in args.eval_datasets}
    for name, shift in shifts.items():
        if "class_map" not in shift:
            raise DataError(f"{name}: its features file has no class_map; re-extract it")

    results = {"method": args.method, "dataset": dataset, "backbone": data["backbone"], "shots": args.shots,
               "seeds": {}, "epoch_seconds": {}, "train_seconds": {}, "model_config": {}, "fit": {},
               "shift": {name: {} for name in shifts}, "recipe": recipe and dataclasses.asdict(recipe),
               "no_negatives": args.no_negatives, "search_val": args.search_val, "device": str(device),
               "features": str(args.features) if args.features else None}
    stale = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        task = make_task(data, seed, args.shots, device, negatives)
        config = saved_config(configured, ckpts[seed], args.load) if ckpts else configured
        model = method.model(task, config)
        results["params"] = tunable_parameters(model)
        # what makes two seeds one run: the same method, K, flags and recipe on the same features
        run_id = dict(method=args.method, shots=args.shots, no_negatives=args.no_negatives, dataset=dataset,
                      backbone=data["backbone"], num_classes=task.pos_text.shape[0], dim=task.pos_text.shape[1],
                      config=dataclasses.asdict(configured), search_val=args.search_val, recipe=results["recipe"])
        if args.save and not ckpts and seed == args.seeds[0]:
            stale = check_save_folder(args, run_id)
        start = time.perf_counter()
        if ckpts:
            model.load_state_dict(ckpts[seed]["state_dict"])
            info = {}
        elif method.fit:
            info = method.fit(model, task, seed)
        else:
            info = train(model, task, recipe, seed, desc=f"{args.method} seed {seed}") if recipe else {}
        seconds = time.perf_counter() - start
        if args.search_val:
            model = search_alpha_gamma(method, task, model)
        results["seeds"][seed] = accuracy(model, *task.test)
        results["train_seconds"][seed] = 0.0 if ckpts else seconds
        results["epoch_seconds"][seed] = info.pop("epoch_seconds", results["train_seconds"][seed])
        results["model_config"][seed] = dataclasses.asdict(model.config)
        results["fit"][seed] = info
        for name, shift in shifts.items():
            classes = shift["class_map"].to(device)
            feats, labels = shift["test"]["features"].to(device, torch.float32), shift["test"]["labels"]
            results["shift"][name][seed] = accuracy(model, feats, labels, classes=classes)
        if args.save and not ckpts:
            ckpt = dict(run=run_id, seed=seed, state_dict=model.state_dict(),
                        model_config=results["model_config"][seed])   # after --search-val: what the model holds
            target = Path(args.save) / f"seed{seed}.pt"
            write_atomic(target, lambda f: torch.save(ckpt, f))
            for path in stale:                       # --overwrite: the other run's seeds go once ours exist
                if path != target:
                    path.unlink(missing_ok=True)
            stale = []

    accs = torch.tensor(list(results["seeds"].values()))
    results.update(test_accuracy=accs.mean().item(), std=accs.std().item() if len(accs) > 1 else 0.0)
    print_table(results)
    if args.out:
        write_atomic(args.out, lambda f: f.write(json.dumps(results, indent=2).encode()))
    return results


def print_table(results):
    """Per-seed test accuracy, mean and standard deviation, seconds per epoch, tunable parameters."""
    print(f"\n{results['method']} on {results['dataset']} ({results['backbone']}), {results['shots']} shots, "
          f"{results['params']:,} tunable parameters")
    print(f"{'seed':>6} {'test acc %':>11} {'s/epoch':>8}" + "".join(f" {n:>21}" for n in results["shift"]))
    for seed, acc in results["seeds"].items():
        shift = "".join(f" {results['shift'][n][seed]:>21.2f}" for n in results["shift"])
        print(f"{seed:>6} {acc:>11.2f} {results['epoch_seconds'][seed]:>8.3f}{shift}")
    print(f"{'mean':>6} {results['test_accuracy']:>11.2f}  ± {results['std']:.2f} (std over seeds)")


# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    methods = "\n".join(f"  {name:<14} {m.about}" for name, m in METHODS.items())
    p = Parser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=f"methods:\n{methods}")
    p.add_argument("--dataset", choices=[d for d in DATASETS if d not in SHIFT_DATASETS],
                   help="dataset key (README: Datasets), e.g. dtd; optional with --features")
    p.add_argument("--shots", type=int, help="K, training images per class (default 16)")
    p.add_argument("--method", choices=list(METHODS), help="default hegraph (the full model); list below")
    p.add_argument("--no-negatives", action="store_true", help="run without the negative text nodes")
    p.add_argument("--features", type=path_arg, help="train on this features file instead of extracting one")
    add_extraction_args(p)
    g = p.add_argument_group("recipe (default: each method's published one; see METHODS in train.py)")
    g.add_argument("--epochs", type=int, help="training epochs; 0 evaluates the model as built")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--batch-size", type=int, help="training images per step")
    defaults = HeGraphConfig()
    for f in dataclasses.fields(HeGraphConfig):  # one flag per field, of the field's type (bool: --x / --no-x)
        if f.name != "variant":
            kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
            g.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, **kind,
                           default=getattr(defaults, f.name), help=f"HeGraphConfig.{f.name} (default %(default)s)")
    g.add_argument("--search-val", action="store_true",
                   help="tune α and γ on the min(K, 4)-shot validation subset (never on test images)")
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
    if args.eval_only != bool(args.load):
        p.error("--eval-only and --load DIR go together")
    for flag, value, low in (("--shots", args.shots, 1), ("--epochs", args.epochs, 0),
                             ("--batch-size", args.batch_size, 1)):
        if value is not None and value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # DataError, and the models' checks of their inputs
        fail(e)


if __name__ == "__main__":
    main()
