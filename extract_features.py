"""
extract_features.py: frozen CLIP features of a few-shot dataset, encoded once into one file.

    python extract_features.py --dataset dtd --root DATA --backbone RN50 --features-dir features/
    python extract_features.py --dataset path/to/my_images     # a folder of class subfolders (docs/datasets.md)
    python extract_features.py --dataset dtd --root DATA --backbone ViT-B-16 --pretrained laion2b_s34b_b88k

train.py extracts on demand with the same flags; this command extracts alone (on a machine with a GPU, say).
The file's layout: docs/features-file.md. An existing file made with the same settings is reused.

From Python: fewshot.extraction.extract_features(fewshot.features.Settings("dtd"), root="data").
"""
from fewshot.cli import extract_command


def main(argv=None):
    """Parse the flags and extract (or reuse) the features file; every error ends in one line."""
    extract_command(argv, description=__doc__)


if __name__ == "__main__":
    main()
