"""Offline evaluation of MPM models: answer language, answer correctness, retrieval accuracy and FID."""

from pathlib import Path

from .answers import answer_names_emoji
from .fid import InceptionFeatures, frechet_distance
from .language import LanguageIdentifier
from .retrieval import retrieval_accuracy


METRICS = ("answer_retrieval", "emoji_answer", "response_language")


def metric_path(name: str) -> str:
    """The file of a local `evaluate` metric module, for `evaluate.load(metric_path(name))` (no Hub needed).

    Args:
        name: `"answer_retrieval"`, `"emoji_answer"` or `"response_language"`.

    Returns:
        The path of the metric's script.
    """
    if name not in METRICS:
        raise ValueError(f"No local metric {name!r}; there are {', '.join(METRICS)}.")
    return str(Path(__file__).with_name("metrics") / f"{name}.py")
