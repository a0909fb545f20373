"""Per-class results of a run (runs.py records them per seed): the weakest classes as the terminal lists them, and
the confusion matrix as --plots draws it (confusion.png).

Both read the results dict: classnames [C], per_class {seed: [accuracy % per class, None without test images]}
and confusion {seed: [C, C] counts, row the true class, column the predicted one}.
"""
import textwrap

import torch

from fewshot.files import write_atomic

WEAKEST = 5         # classes the terminal lists
MAX_SHOWN = 100     # classes confusion.png shows (the weakest, when there are more)


def shorter(name, width):
    """A class name cut to `width` characters, an ellipsis showing the cut."""
    return name if len(name) <= width else name[:width - 1] + "…"


def summed_confusion(results) -> torch.Tensor:
    """[C, C] test predictions summed over the seeds (every seed tests the same images)."""
    return torch.tensor([results["confusion"][s] for s in results["confusion"]], dtype=torch.long).sum(0)


def mean_per_class(results) -> list:
    """Each class's test accuracy %, mean over the seeds (None for a class without test images)."""
    per_seed = list(results["per_class"].values())
    return [None if per_seed[0][c] is None else sum(p[c] for p in per_seed) / len(per_seed)
            for c in range(len(results["classnames"]))]


def weakest(results, n):
    """The n classes of lowest mean accuracy (ties: in class order), classes without test images left out."""
    acc = mean_per_class(results)
    return sorted((c for c, a in enumerate(acc) if a is not None), key=lambda c: (acc[c], c))[:n]


def weakest_lines(results, n=WEAKEST):
    """The terminal's list: the weakest classes, each with its accuracy and the class it is most often taken for."""
    names, acc, total = results["classnames"], mean_per_class(results), summed_confusion(results)
    seeds = len(results["confusion"])
    width = min(32, max(len(names[c]) for c in weakest(results, n)))
    lines = [f"weakest classes: test accuracy % ({'mean over ' + str(seeds) + ' seeds' if seeds > 1 else '1 seed'}), "
             f"and the class each is most often taken for"]
    for c in weakest(results, n):
        wrong = total[c].clone()
        wrong[c] = 0
        j = int(wrong.argmax())
        taken = f"{names[j]} ({100 * wrong[j].item() / total[c].sum().item():.0f} % of its test images)" \
            if wrong[j] > 0 else "–"
        lines.append(f"  {shorter(names[c], width):<{width}} {acc[c]:6.2f}   {taken}")
    return lines


def plot_confusion(results, path):
    """confusion.png: the test confusion matrix summed over the seeds, each row as % of its class's test images,
    the class names on both axes (the MAX_SHOWN weakest classes when there are more). Sized to stay readable from
    10 to 100 classes: about 0.17 inch a class, and cell values written out up to 25 classes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, total = results["classnames"], summed_confusion(results)
    C = len(names)
    shown = sorted(weakest(results, MAX_SHOWN)) if C > MAX_SHOWN else list(range(C))
    counts = total[shown][:, shown].double()
    percent = 100 * counts / total[shown].sum(1, keepdim=True).clamp(min=1).double()     # [n, n]
    n = len(shown)
    side = min(22.0, max(6.0, 0.17 * n + 3.0))                                           # inches
    font = max(5.0, min(9.0, 600 / max(n, 1)))                                          # points
    fig, ax = plt.subplots(figsize=(side + 1.2, side), layout="constrained")
    image = ax.imshow(percent.numpy(), cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    labels = [shorter(names[c], 28) for c in shown]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if percent[i, j] >= 0.5:
                    ax.text(j, i, f"{percent[i, j]:.0f}", ha="center", va="center", fontsize=font,
                            color="white" if percent[i, j] > 60 else "black")
    fig.colorbar(image, ax=ax, shrink=0.6, label="% of the true class's test images")
    seeds = list(results["confusion"])
    subset = f", the {n} weakest of {C} classes" if n < C else ""
    title = (f"{results['method']} on {results['dataset']} ({results['backbone']}), {results['shots']} shots: "
             f"test confusion{subset}, summed over seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    ax.set_title("\n".join(textwrap.wrap(title, int(side * 11))), fontsize=10)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
