"""Exact match as an `evaluate` module that loads from this file, so it works without the Hub: the share of
predictions equal to their reference after SQuAD's normalisation (`peft_post.generation.normalize_answer`)."""

import datasets
import evaluate

from peft_post.generation import normalize_answer

_DESCRIPTION = "Exact match: the share of predictions equal to their reference (lowercase, no punctuation/articles)."
_KWARGS_DESCRIPTION = "Args: predictions (list of str), references (list of str). Returns: {'exact_match': float}."

# `evaluate.load` runs this file on its own, so each shipped metric states its features itself.
FEATURES = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
                                   features=FEATURES)

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("Exact match of zero predictions is undefined.")
        hits = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(hits) / len(hits)}
