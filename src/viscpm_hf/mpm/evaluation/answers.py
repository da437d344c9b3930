"""Is a chat answer right? It must name the shown emoji, in any of the languages of the name tables."""

import unicodedata
from collections.abc import Mapping


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def answer_names_emoji(answer: str, names: Mapping[str, str]) -> bool:
    """Whether an answer names the emoji, in any language.

    Args:
        answer: the model's answer.
        names: language -> the emoji's name in it.

    Returns:
        True if `answer` contains one of the names, ignoring case and width.
    """
    answer = _normalise(answer)
    return any(_normalise(name) in answer for name in names.values() if name)
