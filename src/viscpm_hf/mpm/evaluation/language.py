"""Which language an answer is in, with `lingua-language-detector` (offline; part of the `[demo]` extra)."""

from collections.abc import Sequence


class LanguageIdentifier:
    """Identifies texts among a fixed set of languages (lingua, offline).

    Args:
        languages: ISO 639-1 codes (`"en"`, `"zh"`, ...) of the languages to tell apart.

    Raises:
        ImportError: lingua is not installed (the `demo` extra installs it).
        ValueError: lingua knows no such language.
    """

    def __init__(self, languages: Sequence[str]):
        try:
            from lingua import IsoCode639_1, Language, LanguageDetectorBuilder
        except ImportError as error:
            raise ImportError("Language identification needs lingua: pip install 'viscpm-hf[demo]'.") from error
        by_code = {}
        for code in languages:
            try:
                by_code[code] = Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper()))
            except AttributeError as error:
                raise ValueError(f"lingua knows no language {code!r}.") from error
        self._codes = {language: code for code, language in by_code.items()}
        self._detector = LanguageDetectorBuilder.from_languages(*by_code.values()).build()

    def __call__(self, texts: Sequence[str]) -> list[str | None]:
        """The language of each text.

        Args:
            texts: the texts.

        Returns:
            The language code of each text; None where the text has no letters to judge by.
        """
        return [self._codes.get(language) for language in self._detector.detect_languages_in_parallel_of(list(texts))]

    def accuracy(self, texts: Sequence[str], expected: str) -> float:
        """The share of `texts` written in `expected` (the paper's response-language accuracy).

        Args:
            texts: the answers to judge (at least one).
            expected: the language code they should be in.

        Returns:
            A share between 0 and 1.
        """
        if not texts:
            raise ValueError("No texts to judge.")
        return sum(code == expected for code in self(texts)) / len(texts)
