"""
bench/reproduce.py: the paper's protocol in one command: every dataset, K, method and seed, then the tables
and figures. Resumable, and safe to run several times at once on one results folder.

    python bench/reproduce.py                        # 11 datasets x K 1 2 4 8 16 x every method, seeds 1 2 3
    python bench/reproduce.py --shift                # ... and Table 1: ImageNet 16-shot -> -V2/-Sketch/-A/-R
    python bench/reproduce.py --datasets dtd eurosat --shots 1 2 -- --epochs 10   # train.py flags after --
    python bench/reproduce.py --features my.pt --shots 1 2 4                      # K over one features file
    python bench/reproduce.py --report               # the outputs again, from results/runs/*.json alone

How it runs, resumes and shares a results folder: fewshot/sweep.py; the tables and figures: fewshot/report.py.
"""
from fewshot.sweep import main

if __name__ == "__main__":
    main()
