"""Translate a caption or LLaVA conversation dataset with any transformers seq2seq MT model (M2M-100, NLLB, ...).

MPM needs only a small share of target-language instructions; the paper made them by machine translation. Images
stay as they are: only texts are translated, `<image>` tags are kept in place. Work is saved after every batch
(`<output>.partial.jsonl`), so an interrupted run resumes where it stopped; the output JSON appears when complete.

    viscpm-translate --input llava.json --output llava_zh.json --model path/to/nllb --source_lang eng_Latn \\
        --target_lang zho_Hans
"""

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer


IMAGE_TAG = "<image>"


class Translator:
    """Batched translation with a seq2seq model; `target_lang` becomes the forced first token where the model
    family needs one (M2M-100: `get_lang_id`, NLLB: the language token)."""

    def __init__(self, model, tokenizer, source_lang: str | None = None, target_lang: str | None = None,
                 max_new_tokens: int = 256, num_beams: int = 1):  # fmt: skip
        self.model, self.tokenizer = model.eval(), tokenizer
        if source_lang is not None and hasattr(tokenizer, "src_lang"):
            tokenizer.src_lang = source_lang
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
        if target_lang is not None:
            if hasattr(tokenizer, "get_lang_id"):
                self.generate_kwargs["forced_bos_token_id"] = tokenizer.get_lang_id(target_lang)
            else:
                token_id = tokenizer.convert_tokens_to_ids(target_lang)
                if token_id is None or token_id == tokenizer.unk_token_id:
                    raise ValueError(f"The tokenizer has no token for target language {target_lang!r}.")
                self.generate_kwargs["forced_bos_token_id"] = token_id

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[str]:
        if not texts:
            return []
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.model.device)
        output = self.model.generate(**inputs, **self.generate_kwargs)
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]


def _texts(record: dict) -> list[str]:
    """The translatable pieces of a record, in order (text around `<image>` tags)."""
    if "conversations" in record:
        return [part for turn in record["conversations"] for part in turn["value"].split(IMAGE_TAG)]
    if "caption" in record:
        return [record["caption"]]
    raise ValueError(f"A record needs 'conversations' (LLaVA) or 'caption'; found {sorted(record)}.")


def _rebuild(record: dict, translated: Iterator[str]) -> dict:
    record = json.loads(json.dumps(record))  # a deep copy; image references and other fields stay
    if "conversations" in record:
        for turn in record["conversations"]:
            parts = turn["value"].split(IMAGE_TAG)
            turn["value"] = IMAGE_TAG.join(_keep_layout(part, next(translated)) for part in parts)
    else:
        record["caption"] = next(translated)
    return record


def _keep_layout(original: str, translation: str) -> str:
    """Keeps the whitespace around a piece (e.g. the newline after `<image>`), which MT models drop."""
    if not original.strip():
        return original
    start = original[: len(original) - len(original.lstrip())]
    end = original[len(original.rstrip()) :]
    return f"{start}{translation}{end}"


def translate_records(records: list[dict], translator: Translator, output: str | os.PathLike, batch_size: int = 16) -> list[dict]:
    """Translates `records` into `output` (JSON), resuming from `<output>.partial.jsonl` if a run was interrupted."""
    output = Path(output)
    partial = output.with_name(output.name + ".partial.jsonl")
    done = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines()] if partial.exists() else []
    if len(done) > len(records):
        raise ValueError(f"{partial} holds more records ({len(done)}) than the input ({len(records)}): delete it.")
    with open(partial, "a", encoding="utf-8") as sink, tqdm(total=len(records), initial=len(done), desc="translating") as bar:
        for start in range(len(done), len(records), batch_size):
            batch = records[start : start + batch_size]
            pieces = [_texts(record) for record in batch]
            flat = [text for texts in pieces for text in texts if text.strip()]
            translations = iter(translator(flat))
            for record, texts in zip(batch, pieces):
                own = iter([next(translations) if text.strip() else text for text in texts])
                translated = _rebuild(record, own)
                sink.write(json.dumps(translated, ensure_ascii=False) + "\n")
                done.append(translated)
            sink.flush()
            bar.update(len(batch))
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(json.dumps(done, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    temporary.replace(output)
    partial.unlink()
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="viscpm-translate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="caption JSON ([{image, caption}]) or LLaVA conversation JSON")
    parser.add_argument("--output", required=True, help="translated JSON to write (same layout, same images)")
    parser.add_argument("--model", required=True, help="local folder of a transformers seq2seq MT model")
    parser.add_argument("--source_lang", help="source language code of the model family (e.g. eng_Latn, en)")
    parser.add_argument("--target_lang", help="target language code, forced as the first generated token")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    records = json.loads(Path(args.input).read_text(encoding="utf-8"))
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    translator = Translator(model, tokenizer, args.source_lang, args.target_lang, args.max_new_tokens, args.num_beams)
    translate_records(records, translator, args.output, args.batch_size)
    print(f"wrote {args.output}")
    return 0
