"""`evaluate` metric: the share of answers written in the language they were asked in (the paper's Figure 5).

Load it offline with `evaluate.load(viscpm_hf.mpm.evaluation.metric_path("response_language"))`.
"""

import datasets
import evaluate

from viscpm_hf.mpm.evaluation.language import LanguageIdentifier


_DESCRIPTION = "Response-language accuracy: lingua identifies each answer's language among the candidate languages."
_INPUTS = """
Args:
    predictions (`list[str]`): the model's answers.
    references (`list[str]`): the ISO 639-1 code each answer should be in ("zh", "en", ...).
    languages (`list[str]`, *optional*): the candidate languages; the references' languages plus English by default
        (English is where a model tuned on English data falls back to).
Returns:
    response_language_accuracy (`float`): share of answers identified as their reference language.
"""


class ResponseLanguage(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, languages=None) -> dict:
        if not predictions:
            raise ValueError("No answers to judge: pass at least one prediction.")
        candidates = sorted(set(languages or ()) | set(references) | ({"en"} if languages is None else set()))
        found = LanguageIdentifier(candidates)(predictions)
        return {"response_language_accuracy": sum(f == r for f, r in zip(found, references)) / len(predictions)}
