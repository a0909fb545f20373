"""Training and evaluation on a task: the recipe's optimizer and schedule, the loop, the fit of each method,
accuracy, and the knob search on the validation subset.

train() is given the training views, labels, recipe and seed, nothing else, so no epoch or setting can be
chosen on test images; the knob search (score_grid, search) scores its grid on validation images only.
"""
import dataclasses
import math
import time

import torch

from fewshot import progress
from fewshot.errors import Diverged
from fewshot.methods import RECIPE_FIELDS, WARMUP_LR, build

# -----------------------------------------------------------------------------
# training: it sees the training views, their labels, the recipe and the seed, nothing else

def schedule(step, warmup_steps, total_steps, lr, constant_warmup=False):
    """Learning rate at a step: warm-up rising linearly from WARMUP_LR (or staying there: constant_warmup), then
    cosine decay to 0."""
    if step < warmup_steps:
        return WARMUP_LR if constant_warmup else WARMUP_LR + (lr - WARMUP_LR) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * lr * (1 + math.cos(math.pi * progress))


def make_optimizer(params, recipe):
    """The recipe's optimizer over params."""
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, eps=recipe.eps, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, eps=recipe.eps, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)


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
    rate = lambda s: schedule(s, warmup, total, recipe.lr, recipe.constant_warmup) / recipe.lr
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    gen = torch.Generator().manual_seed(seed)                                # shuffles and view draws
    first_bad = torch.tensor(-1, device=views.device)                        # first step with a bad loss
    model.train()
    start, step = time.perf_counter(), 0
    with progress.bar(total=recipe.epochs, desc=f"training {desc}".strip(), unit="epochs", leave=False,
                      dynamic_ncols=True) as bar:  # a bar on a terminal, lines in a log
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
def predictions(model, feats, classes=None, batch_size=4096):
    """The model's predicted class of each row of feats [n, d], in eval mode, in batches: [n] on the model's
    device. classes [C'] (optional): predict among these columns only (an ImageNet shift set's classes), as
    indices into them."""
    model.eval()
    out = [(model(f) if classes is None else model(f)[:, classes]).argmax(1) for f in feats.split(batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(model, feats, labels, classes=None, batch_size=4096):
    """Top-1 accuracy in percent of the model's prediction (see predictions)."""
    predicted = predictions(model, feats, classes, batch_size)
    correct = (predicted == labels.to(predicted.device)).sum().item()
    return 100.0 * correct / max(1, labels.numel())


def recipe_at(recipe, point):
    """The recipe a grid point trains with: its recipe knobs (the learning rate) set; None stays None."""
    return recipe and dataclasses.replace(recipe, **{k: v for k, v in point.items() if k in RECIPE_FIELDS})


def confusion_matrix(predicted, labels, num_classes):
    """[C, C] counts of test images: row the true class, column the predicted one."""
    labels = labels.to(predicted.device).long()
    return torch.bincount(labels * num_classes + predicted, minlength=num_classes ** 2).view(
        num_classes, num_classes).cpu()


def fit_at(method, task, config, recipe, point, seed):
    """Build and fit the model at one grid point's training knobs (config fields, or the recipe's "lr").
    Returns (model, info)."""
    recipe = recipe_at(recipe, point)
    point = {k: v for k, v in point.items() if k not in method.post_hoc and k not in RECIPE_FIELDS}
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


def tunable_parameters(model):
    """The number of parameters training changes."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
