"""The local `evaluate` metric modules load offline through `evaluate.load` and score known inputs."""

import importlib.util

import evaluate
import pytest

from viscpm_hf.evaluation import metric_path


def test_emoji_answer_counts_answers_naming_the_emoji_in_any_language():
    metric = evaluate.load(metric_path("emoji_answer"))
    answers = ["这是大象。", "It is a CAT face.", "Das ist ein Hund."]
    names = [["elephant", "大象"], ["cat face", "猫脸"], ["pig", "Schwein"]]
    assert metric.compute(predictions=answers, references=names) == {"answer_accuracy": 2 / 3}
    with pytest.raises(ValueError, match="No answers"):
        metric.compute(predictions=[], references=[])


@pytest.mark.skipif(importlib.util.find_spec("lingua") is None, reason="needs the [demo] extra (lingua)")
def test_response_language_compares_the_identified_language_with_the_asked_one():
    metric = evaluate.load(metric_path("response_language"))
    answers = ["这是一头大象。", "It is an elephant.", "Das ist ein Elefant auf dem Bild."]
    # English is a candidate by default, so the English answer to a Chinese question counts as wrong.
    assert metric.compute(predictions=answers, references=["zh", "zh", "de"]) == {"response_language_accuracy": 2 / 3}
    result = metric.compute(predictions=answers[:2], references=["en", "en"], languages=["en", "zh"])
    assert result == {"response_language_accuracy": 0.5}


def test_an_unknown_metric_name_lists_the_local_ones():
    with pytest.raises(ValueError, match="emoji_answer, response_language"):
        metric_path("bleu")
