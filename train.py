"""
train.py: train HeGraphAdapter, or a baseline, on cached CLIP features and report honest test accuracy.

    python train.py --dataset dtd --shots 16                     # extract features if needed, train, evaluate
    python train.py --features my_feats.pt --shots 4 --method tip-f
    python train.py --dataset dtd --shots 4 --method taskres --search-val   # its knobs tuned on validation images

A run is a straight line: load the features, plan the run from the flags, then for each seed build the K-shot
task, build the model, train it (or search its knobs on the validation subset), evaluate it, and record. The
training set is the first K columns of the features file's fewshot[seed]; the cache holds one key per image (the
mean of its stored views) and each epoch draws one stored view per image. Training is given the training views,
labels, recipe and seed, nothing else, so no epoch or setting can be chosen on test images; --search-val scores
its grid on the min(K, 4)-shot validation subset only. The number reported is the test accuracy after the last
epoch, as mean and standard deviation (n - 1) over the seeds. Every method is one row of fewshot/methods.py.

From Python, the same run: fewshot.runs.run(fewshot.runs.RunRequest(dataset="dtd", shots=16)).
"""
from fewshot.cli import train_command


def main(argv=None):
    """Parse the flags into a RunRequest and run it; every error ends in one line."""
    train_command(argv, description=__doc__)


if __name__ == "__main__":
    main()
