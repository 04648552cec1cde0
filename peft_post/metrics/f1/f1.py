"""F1 as an `evaluate` module that loads from this file, so it works without the Hub: the Hub's ``evaluate-metric/f1``
(scikit-learn's ``f1_score``) for single-label classes, with ``zero_division=0``: a class that is neither predicted nor
present scores 0.
"""

import datasets
import evaluate
from sklearn.metrics import f1_score

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
        if len(predictions) == 0:
            raise ValueError("F1 of zero predictions is undefined.")
        score = f1_score(references, predictions, labels=labels, pos_label=pos_label, average=average,
                         sample_weight=sample_weight, zero_division=0)
        return {"f1": float(score) if average is not None else score.tolist()}
