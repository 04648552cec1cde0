"""Accuracy as an `evaluate` module that loads from this file, so it works without the Hub: the Hub's
``evaluate-metric/accuracy`` (scikit-learn's ``accuracy_score``)."""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = "Accuracy: the fraction of predictions equal to their references."
_KWARGS_DESCRIPTION = "Args: predictions (list of int), references (list of int). Returns: {'accuracy': float}."


# `evaluate.load` runs this file on its own, so each shipped metric states its features itself.
FEATURES = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
                                   features=FEATURES)

    def _compute(self, predictions, references, sample_weight=None):
        if len(predictions) == 0:
            raise ValueError("Accuracy of zero predictions is undefined.")
        return {"accuracy": float(accuracy_score(references, predictions, sample_weight=sample_weight))}
