"""CPM-Bee decoding speed against a Llama of the same width, depth and vocabulary, and conversion memory.

Prints, in one run:
- decode tokens/s with the KV cache, CpmBeeForCausalLM / LlamaForCausalLM (target ratio >= 0.8);
- CPM-Bee time per decoded token at sequence lengths 128, 512, 2048 (must grow at most linearly);
- decode tokens/s with the dynamic cache (eager) and with a static cache and `torch.compile` (`--compile`);
- peak RSS of `viscpm-convert chat` on synthetic original-format checkpoints of 2.5 and 10 GB, as a ratio to their
  size (target for the 10 GB one: <= 0.15x; the released 20.6 GB file should need well under a tenth of its size).

`--real-config` instead builds the released 10B configuration with random weights in bf16 on the GPU and prints
batch-1 decode tokens/s (dynamic cache; static cache + compile) beside the bandwidth limit (bytes of weights read per
token / the measured memory bandwidth), and peak memory in bf16 and 4-bit (bitsandbytes NF4). Without a GPU it runs
the same code at a small size on the CPU and says so.

    python benchmarks/bench_cpmbee.py [--hidden 512] [--layers 8] [--tokens 32] [--convert-gb 2.5 10] [--skip-convert]
    python benchmarks/bench_cpmbee.py --convert-only
    python benchmarks/bench_cpmbee.py --compile --skip-convert
    python benchmarks/bench_cpmbee.py --real-config
"""

import argparse
import json
import math
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import median_seconds, per_round_ratio
from transformers import LlamaConfig, LlamaForCausalLM

from viscpm_hf import CpmBeeConfig, CpmBeeForCausalLM


VOCAB = 86583


def token_timer(model, prompt_length: int, new_tokens: int, **generate_kwargs):
    """A function that measures once the seconds per decoded token: generate(n + 1) minus generate(1), so the
    prefill cancels out."""
    input_ids = torch.randint(11, 5000, (1, prompt_length), device=model.device)
    greedy = {"do_sample": False, "num_beams": 1, "pad_token_id": 0, "eos_token_id": None, **generate_kwargs}

    @torch.inference_mode()
    def seconds(n: int) -> float:
        start = time.perf_counter()
        model.generate(input_ids=input_ids, max_new_tokens=n, min_new_tokens=n, **greedy)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return lambda: (seconds(new_tokens + 1) - seconds(1)) / new_tokens


def seconds_per_token(model, prompt_length: int, new_tokens: int, repeats: int, **generate_kwargs) -> float:
    """Median seconds per decoded token over `repeats` measurements, after a warm-up."""
    measure = token_timer(model, prompt_length, new_tokens, **generate_kwargs)
    measure()
    return statistics.median(measure() for _ in range(repeats))


def decode_comparison(args) -> None:
    heads = args.hidden // 64
    torch.manual_seed(0)
    cpmbee = CpmBeeForCausalLM(
        CpmBeeConfig(
            vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
            head_dim=64, intermediate_size=3 * args.hidden,
        )
    ).eval()
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
            num_key_value_heads=heads, intermediate_size=3 * args.hidden, tie_word_embeddings=True,
            max_position_embeddings=4096,
        )
    ).eval()
    print(f"width {args.hidden}, {args.layers} layers, {heads} heads, vocab {VOCAB}: CPM-Bee "
          f"{cpmbee.num_parameters() / 1e6:.1f}M, Llama {llama.num_parameters() / 1e6:.1f}M parameters")
    llama_s, cpmbee_s, ratio = per_round_ratio(  # Llama's seconds / CPM-Bee's = CPM-Bee's relative throughput
        token_timer(llama, 128, args.tokens), token_timer(cpmbee, 128, args.tokens), args.repeats
    )
    print(f"decode at 128 prompt tokens: CPM-Bee {1 / cpmbee_s:7.1f} tok/s   Llama {1 / llama_s:7.1f} tok/s   "
          f"throughput ratio CPM-Bee / Llama {ratio:.3f} (median of {args.repeats} alternated rounds)")
    base = None
    for length in (128, 512, 2048):
        per_token = seconds_per_token(cpmbee, length, args.tokens, args.repeats)
        base = base or per_token
        print(f"CPM-Bee time per decoded token at {length:5d} tokens: {per_token * 1e3:7.2f} ms "
              f"({per_token / base:.2f}x the 128-token time, sequence {length / 128:.0f}x)")


def compiled_decoding(model, tokens: int, repeats: int) -> tuple[float, float, float]:
    """Seconds per decoded token with the dynamic cache in eager mode and with a static cache and the forward
    compiled, alternated in rounds; and the median per-round speed-up of the compiled one."""
    eager_timer = token_timer(model, 128, tokens)
    compiled_forward = torch.compile(model.forward)
    static_timer = token_timer(model, 128, tokens, cache_implementation="static")

    def compiled_timer() -> float:
        model.forward = compiled_forward
        try:
            return static_timer()
        finally:
            del model.forward  # back to the class's forward

    return per_round_ratio(eager_timer, compiled_timer, repeats)


def compile_comparison(args) -> None:
    torch.manual_seed(0)
    model = CpmBeeForCausalLM(
        CpmBeeConfig(
            vocab_size=VOCAB, hidden_size=args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64, head_dim=64, intermediate_size=3 * args.hidden,
        )
    ).eval()  # fmt: skip
    eager, compiled, speedup = compiled_decoding(model, args.tokens, args.repeats)
    print(f"CPU decode at 128 prompt tokens: dynamic cache eager {1 / eager:7.1f} tok/s   static cache + "
          f"torch.compile {1 / compiled:7.1f} tok/s   speed-up {speedup:.2f}x (median of per-round ratios)")


def memory_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large on-device copy (read + write), the ceiling of weight-bound decoding."""
    source = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)

    def copy():
        target.copy_(source)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return 2 * source.numel() / median_seconds(copy, 5)


def real_scale(args) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    config = CpmBeeConfig()  # the released CPM-Bee 10B
    if cuda:
        print(f"{torch.cuda.get_device_name()}: the released 10B configuration, random weights, bf16")
    else:
        config = CpmBeeConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, head_dim=64,
                              intermediate_size=1280)  # fmt: skip
        print("no GPU here: the --real-config code runs at a small size (width 512, 4 layers, the 10B's vocabulary) "
              "on the CPU; these figures are not the 10B's")
    torch.manual_seed(0)
    with torch.device(device):
        model = CpmBeeForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    limit = memory_bandwidth(device) / weight_bytes
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    eager, compiled, speedup = compiled_decoding(model, args.tokens, args.repeats)
    print(f"{model.num_parameters() / 1e9:.2f}B parameters, {weight_bytes / 1e9:.1f} GB of weights read per token")
    print(f"batch-1 decode: dynamic cache {1 / eager:.1f} tok/s, static cache + compile {1 / compiled:.1f} tok/s "
          f"({speedup:.2f}x), bandwidth limit {limit:.1f} tok/s ({1 / compiled / limit:.0%} of it compiled)")
    if not cuda:
        print(f"memory: bf16 weights {model.get_memory_footprint() / 1e9:.2f} GB (peak GPU memory needs a GPU)")
        return
    print(f"peak GPU memory, bf16: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    from transformers import BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        quantized = CpmBeeForCausalLM.from_pretrained(
            folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16),
            device_map="cuda",
        )  # fmt: skip
        four_bit = seconds_per_token(quantized, 128, args.tokens, args.repeats)
    print(f"peak GPU memory, 4-bit NF4: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
          f"(decode {1 / four_bit:.1f} tok/s)")


def file_backed_tensor(path: Path, shape: tuple[int, ...], block: torch.Tensor) -> torch.Tensor:
    """A float16 tensor whose memory is the file `path` (so that building a 10 GB checkpoint needs no 10 GB of RAM),
    filled with repeats of `block`: random values, written fast."""
    numel = math.prod(shape)
    tensor = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float16)
    for start in range(0, numel, block.numel()):
        piece = tensor[start : start + block.numel()]
        piece.copy_(block[: piece.numel()])
    return tensor.view(shape)


def synthetic_checkpoint(path: Path, size_gb: float) -> dict:
    """An original-format VisCPM-Chat state dict (fp16) with a CPM-Bee scaled to about `size_gb`, saved with
    `torch.save` (one storage per tensor, as the release) from file-backed tensors."""
    hidden, ff = 2048, 5120
    per_layer = (4 * hidden * hidden + 3 * hidden * ff) * 2
    layers = max(1, int((size_gb * 1e9 - VOCAB * hidden * 2) / per_layer))
    llm = {"vocab_size": VOCAB, "dim_model": hidden, "num_heads": 16, "dim_head": 128, "dim_ff": ff, "num_layers": layers,
           "position_bias_num_buckets": 256, "position_bias_num_segment_buckets": 256,
           "position_bias_max_distance": 2048, "eps": 1e-6}  # fmt: skip
    vision = {"img_size": 224, "patch_size": 16, "encoder_embed_dim": 64, "encoder_attention_heads": 4,
              "encoder_ffn_embed_dim": 128, "encoder_layers": 2}  # fmt: skip
    from viscpm_hf.convert.chat import (
        chat_config_from_original,
        convert_chat_key,  # noqa: F401  (the layout we invert below)
    )

    config = chat_config_from_original(llm, vision)
    with torch.device("meta"):
        from viscpm_hf import VisCPMChatForConditionalGeneration

        meta = VisCPMChatForConditionalGeneration(config)
    shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
    state = {}
    original_names = _original_names(llm["num_layers"], vision["encoder_layers"])
    scratch = path.parent / "scratch"
    scratch.mkdir()
    block = torch.randn(2**25, generator=torch.Generator().manual_seed(0)).half()
    for index, original in enumerate(original_names):
        new = convert_chat_key(original)
        state[original] = file_backed_tensor(scratch / f"{index}.bin", shapes[new] if new else (1,), block)
    torch.save(state, path)
    del state
    shutil.rmtree(scratch)
    return {"llm": llm, "vision": vision}


def _original_names(llm_layers: int, vision_layers: int) -> list[str]:
    names = ["query", "mapping.0.weight", "mapping.0.bias", "mapping.2.weight", "mapping.2.bias",
             "vpm.beit3.vision_embed.cls_token", "vpm.beit3.vision_embed.proj.weight",
             "vpm.beit3.vision_embed.proj.bias", "vpm.beit3.encoder.embed_positions.A.weight",
             "vpm.beit3.encoder.embed_positions.B.weight", "llm.input_embedding.weight",
             "llm.position_bias.relative_attention_bias", "llm.encoder.output_layernorm.weight"]  # fmt: skip
    for expert in "AB":
        names += [f"vpm.beit3.encoder.layer_norm.{expert}.{p}" for p in ("weight", "bias")]
        for i in range(vision_layers):
            layer = f"vpm.beit3.encoder.layers.{i}"
            for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                           "self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):  # fmt: skip
                names += [f"{layer}.{module}.{expert}.{p}" for p in ("weight", "bias")]
            for module in ("fc1", "fc2", "ffn_layernorm"):
                names += [f"{layer}.ffn.{expert}.{module}.{p}" for p in ("weight", "bias")]
    for i in range(llm_layers):
        layer = f"llm.encoder.layers.{i}"
        names += [f"{layer}.self_att.layernorm_before_attention.weight", f"{layer}.ffn.layernorm_before_ffn.weight"]
        names += [f"{layer}.self_att.self_attention.project_{x}.weight" for x in "qkv"]
        names += [f"{layer}.self_att.self_attention.attention_out.weight", f"{layer}.ffn.ffn.w_out.weight"]
        names += [f"{layer}.ffn.ffn.w_in.w_{x}.weight" for x in "01"]
    return names


def conversion_memory(size_gb: float) -> float:
    """Converts a synthetic checkpoint of about `size_gb` in a fresh process; prints and returns peak RSS / size."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder) / "release"  # the converted folder goes beside it: never inside an input's folder
        folder.mkdir()
        checkpoint = folder / "viscpm_chat_synthetic.pt"
        # Built in a child process, so that this one stays small: a forked child starts with its parent's RSS.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            configs = pool.apply(synthetic_checkpoint, (checkpoint, size_gb))
        (folder / "llm.json").write_text(json.dumps(configs["llm"]))
        (folder / "vision.json").write_text(json.dumps(configs["vision"]))
        vocab = folder / "bee.txt"
        vocab.write_text("\n".join(["<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<root>", "<ans>"]
                                   + [f"t{i}" for i in range(10, VOCAB)]))
        size = checkpoint.stat().st_size
        measure = ("import resource, sys; from viscpm_hf.convert.cli import main; code = main(sys.argv[1:]); "
                   "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
        command = [sys.executable, "-c", measure, "chat", "--checkpoint", str(checkpoint), "--vocab",
                   str(vocab), "--output", str(folder.parent / "out"), "--llm-config", str(folder / "llm.json"),
                   "--vision-config", str(folder / "vision.json")]  # fmt: skip
        start = time.perf_counter()
        result = subprocess.run(command, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        peak = int(result.stdout.split()[-1]) * 1024  # the converter's own peak, in KiB
        print(f"conversion of a {size / 1e9:.2f} GB .pt checkpoint: {seconds:.1f} s, peak RSS {peak / 1e9:.2f} GB "
              f"= {peak / size:.3f}x the checkpoint size", flush=True)
        return peak / size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--convert-gb", type=float, nargs="+", default=[2.5, 10.0],
                        help="sizes of the synthetic checkpoints to convert (each needs about twice its size on disk)")
    parser.add_argument("--skip-convert", action="store_true")
    parser.add_argument("--convert-only", action="store_true", help="Only the conversion memory.")
    parser.add_argument("--compile", action="store_true", help="Also time a static cache with torch.compile.")
    parser.add_argument("--real-config", action="store_true", help="The released 10B on the GPU (see above).")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.real_config:
        real_scale(args)
        return
    if not args.convert_only:
        decode_comparison(args)
        if args.compile:
            compile_comparison(args)
    if not args.skip_convert:
        ratios = {size: conversion_memory(size) for size in args.convert_gb}
        print("peak RSS / checkpoint size: " + ", ".join(f"{size:g} GB {ratio:.3f}x" for size, ratio in ratios.items())
              + " (target for 10 GB: <= 0.15x)")


if __name__ == "__main__":
    main()
