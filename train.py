"""
train.py: train HeGraphAdapter, or a baseline, on cached CLIP features and report honest test accuracy.

    python train.py --dataset dtd --shots 16                     # extract features if needed, train, evaluate
    python train.py --features my_feats.pt --shots 4 --method tip-f

For each seed the K-shot training set is the first K columns of the features file's fewshot[seed]; the
cache holds one key per training image (the mean of its stored views) and each epoch draws one stored
view per image. Nothing is selected on the test split: the number reported is the test accuracy after
the last epoch, as mean and standard deviation over the seeds. --search-val may tune α and γ on the
min(K, 4)-shot validation subset, never on test images.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from extract_features import (DATASETS, FORMAT, DataError, add_extraction_args, extract_from_args, features_path,
                              path_arg, write_atomic)
from hegraphadapter import HeGraphAdapter, HeGraphConfig, cache_logits, normalize

METHODS = ("zeroshot", "tip", "tip-f", "hegraph", "hegraph-t", "hegraph-tn", "hegraph-tp")
SHIFT_DATASETS = ("imagenetv2", "imagenet-sketch", "imagenet-adversarial", "imagenet-rendition")

# The paper's recipe (section 4.1): 100 epochs for EuroSAT, DTD and FGVCAircraft, 30 for the others;
# lr 0.01 for FGVCAircraft, 0.001 for the others. The β's are not given per dataset: HeGraphConfig's
# defaults serve every dataset. Tip-Adapter-F keeps its own recipe (TIP_F below), as in its paper.
#                  epochs   lr
RECIPES = {
    "eurosat":       (100, 1e-3),
    "dtd":           (100, 1e-3),
    "fgvc_aircraft": (100, 1e-2),
}
DEFAULT_RECIPE = (30, 1e-3)
# Tip-Adapter-F's own recipe: AdamW, cosine, 20 epochs, lr 1e-3, eps 1e-4, no warm-up, trained on the
# views against their own keys (no leave-one-out), exactly as its paper does: the baseline at its best.
TIP_F = dict(epochs=20, lr=1e-3, eps=1e-4)
WARMUP_LR = 1e-5                             # the warm-up epoch starts from this learning rate


class TipAdapter(nn.Module):
    """Tip-Adapter (training-free) and Tip-Adapter-F (learn_keys=True: the cache keys are the parameters).

    logits = s f P^T + α exp(-γ (1 - f K^T)) L, with K the cache keys [N, d] and L = onehot(labels).
    α and γ are read from a HeGraphConfig, so that both models share the α/γ search.
    """

    def __init__(self, pos_text, cache_feats, cache_labels, config, logit_scale=100.0, learn_keys=False):
        super().__init__()
        self.config, self.logit_scale = config, float(logit_scale)
        self.register_buffer("P", normalize(pos_text), persistent=False)                   # [C, d]
        self.register_buffer("cache_labels", cache_labels.to(pos_text.device).long(), persistent=False)
        keys = normalize(cache_feats.to(pos_text))                                          # [N, d]
        if learn_keys:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys, persistent=False)

    def logits(self, image_feats, exclude=None):
        """Zero-shot logits [B, C] and cache logits [B, C]; exclude as in HeGraphAdapter.logits."""
        f = normalize(image_feats.to(self.P))                                               # [B, d]
        exclude = None if exclude is None else exclude.to(f.device)
        logits_v = cache_logits(f @ self.keys.T, self.cache_labels, self.P.shape[0], self.config.gamma, exclude)
        return self.logit_scale * f @ self.P.T, logits_v

    def forward(self, image_feats):
        logits_t, logits_v = self.logits(image_feats)
        return logits_t + self.config.alpha * logits_v

    def loss(self, image_feats, labels, exclude=None):
        logits_t, logits_v = self.logits(image_feats, exclude)
        return F.cross_entropy(logits_t + self.config.alpha * logits_v, labels.to(logits_t.device))


# -----------------------------------------------------------------------------
# features file -> one few-shot task

@dataclasses.dataclass
class Task:
    """Everything one run needs, on one device, in float32."""
    pos_text: torch.Tensor           # [C, d] positive text features
    neg_text: torch.Tensor | None    # [C, d] negative text features, None without negatives
    train_views: torch.Tensor        # [V, n, d] the stored views of the n = C*K few-shot images
    train_labels: torch.Tensor       # [n]
    cache_feats: torch.Tensor        # [n, d] one cache key per image: the mean of its views
    val: tuple | None                # (features [m, d], labels [m]) of the min(K, 4)-shot val subset
    test: tuple                      # (features [M, d], labels [M])
    logit_scale: float


def load_features(path):
    """Load and check a features file (README: "The features file"); one clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"features file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a torch.save'd dict
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{path} is not a readable features file ({type(e).__name__}: {first_line})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"{path} is not a features file of format {FORMAT!r} "
                         f"(found format {data.get('format') if isinstance(data, dict) else None!r})")
    missing = [k for k in ("backbone", "logit_scale", "classnames", "text", "test") if k not in data]
    if missing:
        raise DataError(f"{path} lacks the key(s) {missing} of format {FORMAT}")
    C, d = data["text"]["positive"].shape
    if len(data["classnames"]) != C:
        raise DataError(f"{path}: {len(data['classnames'])} class names but {C} positive text features")
    for name in ("train", "val", "test"):
        if name in data and data[name]["features"].shape[-1] != d:
            raise DataError(f"{path}: {name} features have size {data[name]['features'].shape[-1]}, "
                             f"text features {d}: they must come from the same encoder")
    return data


def make_task(data, seed, shots, device, negatives=True):
    """The K-shot task of one seed: few-shot views and cache, val subset, test set, text features."""
    if "fewshot" not in data or "train" not in data:
        raise DataError(f"the features of {data.get('dataset')!r} have no training split (a test-only set?)")
    if seed not in data["fewshot"]:
        raise DataError(f"the features file has no few-shot subset for seed {seed} (it has seeds "
                         f"{sorted(data['fewshot'])}); extract features with that seed")
    subset = data["fewshot"][seed]                                            # [C, max_shots]
    if not 1 <= shots <= subset.shape[1]:
        raise DataError(f"--shots {shots} is outside 1..{subset.shape[1]}, the max-shots of the features "
                         f"file; extract features with --max-shots {shots} or more")
    if negatives and "negative" not in data["text"]:
        raise DataError("the features file has no negative text features: run with --no-negatives")
    f32 = lambda t: t.to(device=device, dtype=torch.float32)
    rows = subset[:, :shots].flatten()                                        # [C*K], class-major
    views = f32(data["train"]["features"][:, rows])                           # [V, C*K, d]
    val = None
    if "val" in data and "val_fewshot" in data:
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
# methods, training, evaluation

def hegraph_config(args):
    """HeGraphConfig from the command line: the variant from --method, every other field from its flag."""
    variant = {"hegraph": "full", "hegraph-t": "t", "hegraph-tn": "tn", "hegraph-tp": "tp"}.get(args.method, "full")
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(HeGraphConfig) if f.name != "variant"}
    return HeGraphConfig(variant=variant, **fields)


def build_model(method, task, config):
    """The model of a method; zeroshot is Tip-Adapter with α = 0."""
    if method.startswith("hegraph"):
        return HeGraphAdapter(task.pos_text, task.neg_text, task.cache_feats, task.train_labels, config,
                              logit_scale=task.logit_scale)
    if method == "zeroshot":
        config = dataclasses.replace(config, alpha=0.0)
    return TipAdapter(task.pos_text, task.cache_feats, task.train_labels, config, task.logit_scale,
                      learn_keys=method == "tip-f")


def schedule(step, steps_per_epoch, total_steps, lr):
    """Learning rate at a step: one warm-up epoch rising linearly from WARMUP_LR, then cosine decay to 0."""
    if step < steps_per_epoch:
        return WARMUP_LR + (lr - WARMUP_LR) * step / steps_per_epoch
    progress = (step - steps_per_epoch) / max(1, total_steps - steps_per_epoch)
    return 0.5 * lr * (1 + math.cos(math.pi * progress))


def train(model, task, epochs, lr, batch_size, seed, eps=1e-8, warmup=True, leave_one_out=True, desc=""):
    """AdamW on the model's parameters; returns seconds per epoch (0 for a method with nothing to learn).

    Each epoch draws one stored view per training image. With leave_one_out an image's own cache key is
    left out of its cache logits, so the cache loss sees the cache as a test image does, even when a
    file stores a single view per image (the view is then the key itself).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or epochs == 0:
        return 0.0
    views, labels = task.train_views, task.train_labels                     # [V, n, d], [n]
    n = labels.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(params, lr=lr, eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (schedule(s, steps_per_epoch if warmup else 0, total, lr)) / lr)
    gen = torch.Generator().manual_seed(seed)                                # shuffles and view draws
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=desc, leave=False, dynamic_ncols=True)
    for _ in bar:
        view = torch.randint(views.shape[0], (n,), generator=gen).to(views.device)
        order = torch.randperm(n, generator=gen).to(views.device)
        for batch in order.split(batch_size):
            loss = model.loss(views[view[batch], batch], labels[batch], exclude=batch if leave_one_out else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return (time.perf_counter() - start) / epochs


@torch.no_grad()
def accuracy(model, feats, labels, batch_size=4096):
    """Top-1 accuracy in percent of the model's prediction, in eval mode, in batches."""
    model.eval()
    correct = 0
    for f, y in zip(feats.split(batch_size), labels.split(batch_size)):
        correct += (model(f).argmax(1) == y).sum().item()
    return 100.0 * correct / max(1, labels.numel())


@torch.no_grad()
def search_alpha_gamma(model, val):
    """Tip-Adapter's search of α and γ, on the validation subset only; sets and returns the best pair."""
    feats, labels = val
    best = (-1.0, model.config.alpha, model.config.gamma)
    for gamma in (0.5, 1, 2, 3, 4, 5, 6, 7, 8, 10):
        model.config = dataclasses.replace(model.config, gamma=gamma)
        logits_t, logits_v = model.logits(feats)
        if logits_v is None:  # text-only variant: nothing to tune
            return None
        for alpha in torch.linspace(0.1, 5, 50).tolist():
            acc = ((logits_t + alpha * logits_v).argmax(1) == labels).float().mean().item()
            best = max(best, (acc, alpha, gamma))
    model.config = dataclasses.replace(model.config, alpha=best[1], gamma=best[2])
    return best[1], best[2]


@torch.no_grad()
def shift_accuracy(model, data, logit_scale):
    """Text classifier only, on an ImageNet shift set whose classes are data["class_map"] of ImageNet's."""
    model.eval()
    text = model.propagate()[0] if isinstance(model, HeGraphAdapter) else model.P      # P' or P [C, d]
    classifier = text[data["class_map"].to(model.P.device)]                            # [C', d]
    feats, labels = (t.to(model.P.device) for t in (data["test"]["features"], data["test"]["labels"]))
    logits = logit_scale * normalize(feats.float()) @ classifier.T
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


# -----------------------------------------------------------------------------
# files: features (extracted on demand), checkpoints, results

def features_for(args, dataset):
    """The features of a dataset: --features if given, else features_dir/<dataset>_<backbone>.pt,
    extracted first, or reused when it was made with the settings asked for (extract_features checks,
    also when the dataset folder is absent)."""
    if args.features and dataset == args.dataset:
        return load_features(args.features)
    return load_features(extract_from_args(args, dataset))


def load_checkpoint(path, data, seed):
    """A checkpoint written by --save, checked against the features it is evaluated on."""
    if not Path(path).is_file():
        raise DataError(f"no checkpoint {path} for seed {seed}: train with --save first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    C, d = data["text"]["positive"].shape
    found = (ckpt["backbone"], ckpt["num_classes"], ckpt["dim"])
    if found != (data["backbone"], C, d):
        raise DataError(f"checkpoint {path} is for backbone {found[0]} with {found[1]} classes of size "
                         f"{found[2]}, the features are {data['backbone']} with {C} classes of size {d}")
    return ckpt


# -----------------------------------------------------------------------------
# command line

def run(args):
    """Train and evaluate one method over the seeds; returns the results dict (also written to --out)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)   # same seed, same device -> same accuracy
    data = features_for(args, args.dataset)
    dataset = data.get("dataset", args.dataset)
    epochs, lr = RECIPES.get(dataset, DEFAULT_RECIPE)
    shifts = {name: features_for(args, name) for name in args.eval_datasets}
    for name, shift in shifts.items():
        if shift["backbone"] != data["backbone"] or "class_map" not in shift:
            raise DataError(f"{name}: needs a test-only features file with class_map of backbone "
                            f"{data['backbone']}, got backbone {shift['backbone']}")
    results = {"seeds": {}, "epoch_seconds": {}, "shift": {}, "alpha_gamma": {}}
    for seed in args.seeds:
        if args.eval_only:
            ckpt = load_checkpoint(Path(args.load) / f"seed{seed}.pt", data, seed)
            for key in ("method", "shots", "no_negatives"):
                setattr(args, key, ckpt[key])
            config = HeGraphConfig(**ckpt["config"])
        else:
            config = hegraph_config(args)
        torch.manual_seed(seed)
        # the baselines and T-P never read negative text features, so they run on files without them
        uses_negatives = args.method.startswith("hegraph") and config.variant != "tp" and not args.no_negatives
        task = make_task(data, seed, args.shots, device, negatives=uses_negatives)
        model = build_model(args.method, task, config)
        seconds = 0.0
        if args.eval_only:
            model.load_state_dict(ckpt["state_dict"])
        elif args.method == "tip-f":
            seconds = train(model, task, args.epochs or TIP_F["epochs"], args.lr or TIP_F["lr"],
                            args.batch_size, seed, eps=TIP_F["eps"], warmup=False, leave_one_out=False,
                            desc=f"tip-f seed {seed}")
        elif args.method.startswith("hegraph"):
            seconds = train(model, task, args.epochs or epochs, args.lr or lr, args.batch_size, seed,
                            desc=f"{args.method} seed {seed}")
        if args.search_val and not args.eval_only:
            if task.val is None:
                raise DataError("--search-val needs a validation split, and the features file has none")
            results["alpha_gamma"][seed] = search_alpha_gamma(model, task.val)
        results["seeds"][seed] = accuracy(model, *task.test)
        results["epoch_seconds"][seed] = seconds
        for name, shift in shifts.items():
            results["shift"].setdefault(name, {})[seed] = shift_accuracy(model, shift, task.logit_scale)
        if args.save:
            ckpt = dict(method=args.method, shots=args.shots, no_negatives=args.no_negatives,
                        config=dataclasses.asdict(model.config), state_dict=model.state_dict(),
                        backbone=data["backbone"], dataset=dataset, num_classes=task.pos_text.shape[0],
                        dim=task.pos_text.shape[1], seed=seed)
            write_atomic(Path(args.save) / f"seed{seed}.pt", lambda f: torch.save(ckpt, f))

    accs = torch.tensor(list(results["seeds"].values()))
    results.update(
        method=args.method, dataset=dataset, backbone=data["backbone"], shots=args.shots,
        test_accuracy=accs.mean().item(), std=accs.std().item() if len(accs) > 1 else 0.0,
        config={**vars(args), "epochs": args.epochs, "lr": args.lr, "device": str(device),
                "hegraph": dataclasses.asdict(config)})
    print_table(results)
    if args.out:
        write_atomic(args.out, lambda f: f.write(json.dumps(results, indent=2, default=str).encode()))
    return results


def print_table(results):
    """Per-seed test accuracy, mean and standard deviation, seconds per epoch."""
    print(f"\n{results['method']} on {results['dataset']} ({results['backbone']}), {results['shots']} shots")
    print(f"{'seed':>6} {'test acc %':>11} {'s/epoch':>8}" + "".join(f" {n:>21}" for n in results["shift"]))
    for seed, acc in results["seeds"].items():
        shift = "".join(f" {results['shift'][n][seed]:>21.2f}" for n in results["shift"])
        print(f"{seed:>6} {acc:>11.2f} {results['epoch_seconds'][seed]:>8.3f}{shift}")
    print(f"{'mean':>6} {results['test_accuracy']:>11.2f}  ± {results['std']:.2f} (std over seeds)")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line gets one line, not the whole usage."""

    def error(self, message):
        fail(f"{message} (python train.py --help lists the options)")


def fail(message):
    """Exit non-zero with one clear line."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=[d for d in DATASETS if d not in SHIFT_DATASETS],
                   help="dataset key (README: Datasets), e.g. dtd; optional with --features")
    p.add_argument("--shots", type=int, default=16, help="K, training images per class (default 16)")
    p.add_argument("--method", default="hegraph", choices=METHODS, help="default hegraph (the full model)")
    p.add_argument("--no-negatives", action="store_true", help="run without the negative text nodes")
    p.add_argument("--features", type=path_arg, help="train on this features file instead of extracting one")
    add_extraction_args(p)
    g = p.add_argument_group("recipe (defaults: the paper's, per dataset; see RECIPES in train.py)")
    g.add_argument("--epochs", type=int, help="training epochs (default: 100 eurosat/dtd/fgvc_aircraft, "
                   "else 30; Tip-Adapter-F 20)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 0.01 fgvc_aircraft, else 0.001)")
    g.add_argument("--batch-size", type=int, default=256, help="training batch size (default 256)")
    defaults = HeGraphConfig()
    for f in dataclasses.fields(HeGraphConfig):
        if f.name != "variant":
            g.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=float,
                           default=getattr(defaults, f.name), help=f"HeGraphConfig.{f.name} (default %(default)s)")
    g.add_argument("--search-val", action="store_true",
                   help="tune α and γ on the min(K, 4)-shot validation subset (never on test images)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=path_arg, help="write the results json here")
    g.add_argument("--save", type=path_arg, help="write the learned parameters and configuration to DIR/seed<N>.pt")
    g.add_argument("--eval-only", action="store_true", help="evaluate checkpoints from --load, no training")
    g.add_argument("--load", type=path_arg, help="checkpoint folder written by --save (with --eval-only)")
    g.add_argument("--eval-datasets", nargs="+", default=[], choices=SHIFT_DATASETS,
                   help="also evaluate the text classifier on these ImageNet shift sets")
    args = p.parse_args(argv)
    if args.dataset is None and args.features is None:
        p.error("give --dataset (features are extracted if needed) or --features FILE")
    if args.eval_only != bool(args.load):
        p.error("--eval-only and --load DIR go together")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # DataError, and the model's checks of its inputs
        fail(e)


if __name__ == "__main__":
    main()
