"""Exact match and token F1 of generated answers as one `evaluate` module that loads from this file, so it works
without the Hub: SQuAD's two answer scores (`peft_post.generation.normalize_answer`, `token_f1`), averaged."""

import datasets
import evaluate

from peft_post.generation import normalize_answer, token_f1

_DESCRIPTION = ("Exact match (share of predictions equal to their reference after SQuAD's normalisation: lowercase, "
                "no punctuation, no articles) and token F1 (SQuAD's bag-of-tokens F1), each averaged over examples.")
_KWARGS_DESCRIPTION = ("Args: predictions (list of str), references (list of str). "
                       "Returns: {'exact_match': float, 'token_f1': float}.")

# `evaluate.load` runs this file on its own, so the module states its features itself.
FEATURES = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})


class AnswerMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
                                   features=FEATURES)

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("Answer scores of zero predictions are undefined.")
        pairs = list(zip(predictions, references))
        return {"exact_match": sum(normalize_answer(p) == normalize_answer(r) for p, r in pairs) / len(pairs),
                "token_f1": sum(token_f1(p, r) for p, r in pairs) / len(pairs)}
