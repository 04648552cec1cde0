"""Token F1 as an `evaluate` module that loads from this file, so it works without the Hub: SQuAD's bag-of-tokens
F1 between each prediction and its reference, averaged (`peft_post.generation.token_f1`)."""

import datasets
import evaluate

from peft_post.generation import token_f1

_DESCRIPTION = "Token F1: SQuAD's F1 over the normalised tokens of each prediction and its reference, averaged."
_KWARGS_DESCRIPTION = "Args: predictions (list of str), references (list of str). Returns: {'token_f1': float}."

# `evaluate.load` runs this file on its own, so each shipped metric states its features itself.
FEATURES = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})


class TokenF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
                                   features=FEATURES)

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("Token F1 of zero predictions is undefined.")
        return {"token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / len(predictions)}
