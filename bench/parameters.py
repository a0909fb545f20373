"""
Tunable parameters of every method of train.py (fewshot/methods.py), at a size given on the command line.

    python bench/parameters.py                       # RN50 on ImageNet: d = 1024, C = 1000, K = 16
    python bench/parameters.py --dim 512 --classes 47 --shots 16

Each model is built by its own METHODS row on random unit features of that size (the count does
not depend on the values), with negative prompts, and counted by training.tunable_parameters.
"""
import argparse

import torch
import torch.nn.functional as F

from fewshot.methods import METHODS, build
from fewshot.tasks import Task
from fewshot.training import tunable_parameters


def random_task(dim, classes, shots):
    """A task of random unit features: text, negative text, one view of C*K images, a small test set."""
    g = torch.Generator().manual_seed(0)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1)
    labels = torch.arange(classes).repeat_interleave(shots)
    views = unit(1, len(labels), dim)
    return Task(pos_text=unit(classes, dim), neg_text=unit(classes, dim), train_views=views,
                      train_labels=labels, cache_feats=views[0], val=None,
                      test=(unit(2, dim), torch.zeros(2, dtype=torch.long)), logit_scale=100.0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1024, help="feature size d (default 1024, RN50)")
    p.add_argument("--classes", type=int, default=1000, help="C (default 1000, ImageNet)")
    p.add_argument("--shots", type=int, default=16, help="K (default 16)")
    a = p.parse_args()
    task = random_task(a.dim, a.classes, a.shots)
    print(f"tunable parameters, d = {a.dim}, C = {a.classes}, K = {a.shots}\n")
    print("| method | tunable parameters |\n|---|---:|")
    for name, method in METHODS.items():
        model = build(method, task, method.config("imagenet"))
        print(f"| `{name}` | {tunable_parameters(model):,} |")


if __name__ == "__main__":
    main()
