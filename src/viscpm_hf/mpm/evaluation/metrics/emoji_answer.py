"""`evaluate` metric: the share of answers that name the shown emoji, in any language of its name table.

Load it offline with `evaluate.load(viscpm_hf.mpm.evaluation.metric_path("emoji_answer"))`.
"""

import datasets
import evaluate

from viscpm_hf.mpm.evaluation.answers import answer_names_emoji


_DESCRIPTION = "Answer correctness: does the answer contain one of the emoji's names (case and width ignored)."
_INPUTS = """
Args:
    predictions (`list[str]`): the model's answers.
    references (`list[list[str]]`): the names of the shown emoji, in any languages.
Returns:
    answer_accuracy (`float`): share of answers naming their emoji.
"""


class EmojiAnswer(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references) -> dict:
        if not predictions:
            raise ValueError("No answers to judge: pass at least one prediction.")
        right = [answer_names_emoji(a, dict(enumerate(names))) for a, names in zip(predictions, references)]
        return {"answer_accuracy": sum(right) / len(right)}
