"""F1 as an `evaluate` module that loads from this file, so it works without the Hub (and without sklearn).

The arguments and results are those of the Hub's ``evaluate-metric/f1`` (scikit-learn's ``f1_score``) for single-label
classes, with ``zero_division=0``: a class that is neither predicted nor present scores 0.
"""

import datasets
import evaluate
import numpy as np

AVERAGES = ("binary", "micro", "macro", "weighted", None)

_DESCRIPTION = "F1: the harmonic mean of precision and recall, 2 TP / (2 TP + FP + FN), per class or averaged."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    labels (list of int, optional): the classes to score (all classes in predictions or references by default).
    pos_label (int): the positive class when average="binary". Defaults to 1.
    average (str or None): "binary" (the F1 of pos_label, for at most two classes; the default), "micro" (from
        the counts summed over classes), "macro" (the unweighted mean of the classes' F1), "weighted" (their mean
        weighted by each class's number of references) or None (one F1 per class, in the order of labels).
    sample_weight (list of float, optional): a weight per example.
Returns: {'f1': float, or a list of floats when average is None}.
"""


# `evaluate.load` runs this file on its own, so each shipped metric states its features itself.
FEATURES = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
                                   features=FEATURES)

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        if average not in AVERAGES:
            raise ValueError(f"`average` must be one of {AVERAGES}, got {average!r}.")
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("F1 of zero predictions is undefined.")
        weight = np.ones(predictions.size) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        present = np.union1d(predictions, references)
        if average == "binary":
            if present.size > 2:
                raise ValueError(f"average='binary' needs at most two classes, got {present.size}; choose another "
                                 f"average among {AVERAGES}.")
            labels = [pos_label]
        labels = present if labels is None else np.asarray(labels, dtype=np.int64)
        # Per class: true positives, predictions of the class (TP + FP) and references of it (TP + FN).
        hit = (predictions[None] == labels[:, None]) & (predictions == references)[None]
        tp = (hit * weight).sum(1)
        predicted = ((predictions[None] == labels[:, None]) * weight).sum(1)
        support = ((references[None] == labels[:, None]) * weight).sum(1)
        if average == "micro":
            tp, predicted, support = tp.sum(keepdims=True), predicted.sum(keepdims=True), support.sum(keepdims=True)
        f1 = np.divide(2 * tp, predicted + support, out=np.zeros_like(tp), where=(predicted + support) > 0)
        if average is None:
            return {"f1": f1.tolist()}
        if average == "weighted":
            return {"f1": float(np.average(f1, weights=support)) if support.sum() > 0 else 0.0}
        return {"f1": float(f1.mean())}
