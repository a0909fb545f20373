"""One seed's K-shot task, read from a features file: the tensors every method is built and trained from.

The training set is the first K columns of the file's fewshot[seed]; the cache holds one key per image (the
mean of its stored views); the validation subset is the first min(K, 4) columns of val_fewshot[seed]; the
test set is the whole test split.
"""
from dataclasses import dataclass

import torch

from fewshot.datasets import VAL_SHOTS
from fewshot.errors import DataError
from hegraphadapter import normalize


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
    classnames: list | None = None   # [C] the features file's class names
    text_encoder: object = None      # coop.TextEncoder: CLIP's frozen text encoder, for rows that run it; else None

    @property
    def cache_labels(self):
        """The cache's labels: its images are the training images."""
        return self.train_labels


def make_task(data, seed, shots, device, negatives=True, text_encoder=None):
    """The K-shot task of one seed: few-shot views and cache, val subset, test set, text features, class names;
    text_encoder: CLIP's frozen text encoder (coop.load_text_encoder), loaded once per run by the rows that need
    it."""
    if "fewshot" not in data or "train" not in data:
        raise DataError(f"the features of {data.get('dataset')!r} have no training split (a test-only set?)")
    if seed not in data["fewshot"]:
        raise DataError(f"the features file has no few-shot subset for seed {seed} (it has seeds "
                        f"{sorted(data['fewshot'])}); run with those --seeds, or with --dataset instead of --features, "
                        f"which adds the seed to the dataset's features file")
    subset = data["fewshot"][seed].long()                                     # [C, max_shots]
    if shots > subset.shape[1]:
        raise DataError(f"--shots {shots} is above {subset.shape[1]}, the max-shots of the features file; run with "
                        f"--shots {subset.shape[1]} or fewer, or with --dataset instead of --features, which adds the "
                        f"images {shots} shots need to the dataset's features file")
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
        classnames=list(data["classnames"]),
        text_encoder=text_encoder,
    )


