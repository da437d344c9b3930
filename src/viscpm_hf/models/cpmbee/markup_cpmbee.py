"""CPM-Bee markup: `<name>` is a special token and `<<` a literal `<`; and the ext table of one structured input.

A leaf module: the tokenizer and the prompt builder both read markup, and neither imports the other for it.
"""

import os
from typing import NamedTuple


# The vocabulary file cannot hold a newline or a bare space on a line of its own.
FILE_SPELLINGS = {"\n": "</n>", " ": "</_>"}
ESCAPE_HINT = "write '<<' for a literal '<', or pass plain text through escape_markup"


class MarkupPiece(NamedTuple):
    """One piece of tokenized markup; `start` counts characters of the text with every `<<` read as one `<`."""

    token: str
    start: int
    is_unk: bool
    is_special: bool


def escape_markup(text: str) -> str:
    """Plain text -> markup that tokenizes as exactly that text (no special tokens)."""
    return text.replace("<", "<<")


def unescape_markup(markup: str) -> str:
    """Inverse of `escape_markup`; special tokens in the markup are kept as written."""
    return markup.replace("<<", "<")


def is_special_name(token: str) -> bool:
    return len(token) > 1 and token.startswith("<") and token.endswith(">")


def load_vocab(vocab_file: str | os.PathLike) -> list[str]:
    """Tokens in id order: one per line, ids are 0-based line numbers."""
    with open(vocab_file, encoding="utf-8", newline="") as file:
        lines = file.read().split("\n")
    if lines[-1] == "":  # a final newline ends the last line, it is not an empty token
        lines.pop()
    from_file = {spelling: text for text, spelling in FILE_SPELLINGS.items()}
    return [from_file.get(line, line) for line in lines]


def split_markup(markup: str) -> list[tuple[str, bool]]:
    """Markup -> chunks `(literal text, False)` and `(special token, True)`; `<<` becomes `<` in literal text."""
    chunks, literal, position = [], [], 0
    while position < len(markup):
        opening = markup.find("<", position)
        if opening < 0:
            literal.append(markup[position:])
            break
        literal.append(markup[position:opening])
        if markup.startswith("<<", opening):
            literal.append("<")
            position = opening + 2
            continue
        closing = markup.find(">", opening + 2)
        stray = markup.find("<", opening + 1, closing if closing >= 0 else len(markup))
        if stray >= 0:
            raise ValueError(
                f"Unexpected '<' at character {stray} inside the special token opened at character {opening} "
                f"({markup[opening : stray + 1]!r}): {ESCAPE_HINT}."
            )
        if closing < 0:
            raise ValueError(
                f"Unexpected end of text: the '<' at character {opening} ({markup[opening : opening + 20]!r}) opens "
                f"a special token such as '<s>' that no '>' closes; {ESCAPE_HINT}."
            )
        if any(literal):
            chunks.append(("".join(literal), False))
        literal = []
        chunks.append((markup[opening : closing + 1], True))
        position = closing + 1
    if any(literal):
        chunks.append(("".join(literal), False))
    return chunks


class CpmBeeExtTable:
    """Out-of-vocabulary strings of one structured input, each named by a (base id, sub id) pair.

    Sub ids count the distinct strings of each base in order of first appearance over the whole input, from 0, so
    the first unknown string of an input is (`<unk>`, 0): the model reads it exactly as a literal `<unk>`.
    """

    def __init__(self):
        self.entries: dict[str, tuple[int, int]] = {}  # string -> (base id, sub id), in order of first appearance
        self._subs_per_base: dict[int, int] = {}

    def add(self, text: str, base_id: int) -> int:
        """Returns the sub id of `text`, numbering it if it is new."""
        if text not in self.entries:
            sub = self._subs_per_base.get(base_id, 0)
            self._subs_per_base[base_id] = sub + 1
            self.entries[text] = (base_id, sub)
        return self.entries[text][1]

    def columns(self, exclude_base: int | None = None) -> list[tuple[int, int]]:
        """(base id, sub id) of every entry with sub > 0, grouped by base in order of the base's first appearance.

        These are the extra logit columns of generation; sub 0 entries are scored by their base's vocabulary column.
        """
        by_base: dict[int, list[int]] = {}
        for base, sub in self.entries.values():
            by_base.setdefault(base, []).append(sub)
        return [(base, sub) for base, subs in by_base.items() if base != exclude_base for sub in subs if sub > 0]


__all__ = ["CpmBeeExtTable", "MarkupPiece", "escape_markup", "split_markup", "unescape_markup"]
