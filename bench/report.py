"""
bench/report.py: the outputs of bench/reproduce.py, rebuilt from its run files alone (no training).

    python bench/report.py --results results/        # or: python bench/reproduce.py --report

What it writes (results/README.md, runs.csv, fewshot.png, tsne.png): fewshot/report.py.
"""
from fewshot.report import main

if __name__ == "__main__":
    main()
