"""
bench/real_layouts.py: CoOp's class-name rule and split on the full split files of Oxford Pets, UCF101, Caltech101
and DTD (fetched by their pinned md5 into --splits, or found there): each laid out with a placeholder image at every
path, extracted with a tiny random CLIP (16 shots, seeds 1 2 3), and checked as tests/test_real_layouts.py checks the
excerpts: CoOp's class order, names and prompts, the whole test split, few-shot rows inside each class's images.

    python bench/real_layouts.py --splits data/coop_splits      # one table row per dataset; exit 1 on a problem

The check: fewshot/testing/real_layouts.py.
"""
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # one table, no progress bars

from fewshot.testing.real_layouts import main

if __name__ == "__main__":
    main()
