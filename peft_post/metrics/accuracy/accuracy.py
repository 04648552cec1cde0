"""Accuracy as an `evaluate` module that loads from this file, so it works without the Hub."""

import datasets
import evaluate

_DESCRIPTION = "Accuracy: the fraction of predictions equal to their references."
_KWARGS_DESCRIPTION = "Args: predictions (list of int), references (list of int). Returns: {'accuracy': float}."


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("Accuracy of zero predictions is undefined.")
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(predictions)}
