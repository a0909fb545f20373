"""
predict.py: classify new images with the models that train.py --save wrote.

    python train.py --dataset path/to/my_images --shots 4 --save models/my_images   # train, keep the models
    python predict.py --model models/my_images photo.jpg more_photos/             # a line per image, top 5
    python predict.py --model models/my_images more_photos/ --top-k 3 --out predictions.csv --seed 1

A model file holds everything it needs (its tensors, class names, text features, cache and which CLIP with
which preprocessing encodes an image for it), so neither the features file nor the dataset has to be there;
the CLIP itself is loaded as the features were extracted with it (--clip-checkpoint: a copy of a checkpoint that
is no longer where the model file says), and checked to be the model's. Each image is encoded as evaluation
encodes a test image (view 0), so predicting a test image gives train.py --eval-only's prediction. The seeds of
a folder are ensembled (mean of their probabilities) unless --seed picks one. Images that cannot be read are
named, one line each, and the others are classified. --out writes CSV or JSON.

From Python: fewshot.classify.load_classifier(folder).predict(images).
"""
from fewshot.classify import predict_command


def main(argv=None):
    """Parse the flags and classify; every error ends in one line."""
    predict_command(argv)


if __name__ == "__main__":
    main()
