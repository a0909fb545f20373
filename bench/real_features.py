"""
bench/real_features.py: accuracy on real CLIP features, every method with its published defaults and tuned on
dev folds with the same budget, on four tasks built from ../shared/realfeats (never copied into the project).

    python bench/real_features.py                                     # every task, both blocks
    python bench/real_features.py --tasks imagenet-500 --block defaults --rows tip-f hegraph
    python bench/real_features.py --dev --rows hegraph -- --bias-scale 0.2   # one setting on the dev folds
    python bench/real_features.py --study --tasks random-50 --designs E1 E4  # graph designs vs the bias-only

The tasks, the test and dev protocols and the tables: fewshot/realfeatures.py.
"""
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: one table, no progress bars

from fewshot.realfeatures import main

if __name__ == "__main__":
    main()
