"""
Tunable parameters of every method of train.py (fewshot/methods.py), at a size given on the command line.

    python bench/parameters.py                       # RN50 on ImageNet: d = 1024, C = 1000, K = 16
    python bench/parameters.py --dim 512 --classes 47 --shots 16 --backbone ViT-B-32

Each model is built by its own METHODS row on random unit features of that size (the count does
not depend on the values), with negative prompts, and counted by training.tunable_parameters. CoOp's
context feeds a random text tower of --backbone's architecture (open_clip's config: its width sets the count).
"""
import argparse
import dataclasses

import torch
import torch.nn.functional as F

from fewshot import backbones
from fewshot.coop import TextEncoder
from fewshot.methods import METHODS, build
from fewshot.tasks import Task
from fewshot.training import tunable_parameters


def random_text_encoder(backbone):
    """CoOp's frozen text encoder: that of a random CLIP of the open_clip architecture `backbone`."""
    oc = backbones.import_open_clip()
    with backbones.quiet_logging():   # "No pretrained weights loaded": random, on purpose
        return TextEncoder(oc.create_model(backbone), oc.get_tokenizer(backbone), backbone)


def random_task(dim, classes, shots, backbone="RN50"):
    """A task of random unit features: text, negative text, one view of C*K images, a small test set; class names
    and a random text encoder for the rows that run one (CoOp)."""
    g = torch.Generator().manual_seed(0)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1)
    labels = torch.arange(classes).repeat_interleave(shots)
    views = unit(1, len(labels), dim)
    return Task(pos_text=unit(classes, dim), neg_text=unit(classes, dim), train_views=views,
                      train_labels=labels, cache_feats=views[0], val=None,
                      test=(unit(2, dim), torch.zeros(2, dtype=torch.long)), logit_scale=100.0,
                      classnames=[f"class {c}" for c in range(classes)],
                      text_encoder=random_text_encoder(backbone))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1024, help="feature size d (default 1024, RN50)")
    p.add_argument("--classes", type=int, default=1000, help="C (default 1000, ImageNet)")
    p.add_argument("--shots", type=int, default=16, help="K (default 16)")
    p.add_argument("--backbone", default="RN50", help="open_clip architecture of CoOp's text tower (default RN50)")
    a = p.parse_args()
    task = random_task(a.dim, a.classes, a.shots, a.backbone)
    print(f"tunable parameters, d = {a.dim}, C = {a.classes}, K = {a.shots}, text tower of {a.backbone} "
          f"(width {task.text_encoder.width})\n")
    print("| method | tunable parameters |\n|---|---:|")
    for name, method in METHODS.items():
        model = build(method, task, method.config("imagenet"))
        print(f"| `{name}` | {tunable_parameters(model):,} |")
        if name == "coop":   # and its class-specific variant
            csc = build(method, task, dataclasses.replace(method.config("imagenet"), csc=True))
            print(f"| `{name} --csc` | {tunable_parameters(csc):,} |")


if __name__ == "__main__":
    main()
