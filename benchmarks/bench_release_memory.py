"""What the released VisCPM models cost to load and run on an ordinary machine, measured at release size.

On the CPU, in one run:
1. writes a synthetic original-format VisCPM-Chat checkpoint with the released shapes (CPM-Bee-10B + BEiT-3 large +
   bridge; random float16 weights saved with `torch.save` as the release; the shapes come from the converter's release
   description in `viscpm_hf.convert.chat`), streamed to disk, and converts it with `viscpm-convert chat --dtype
   bfloat16`, reporting the converter's peak memory;
2. in a fresh process for each, loads the converted folder with the Auto classes and asks one question about an image
   (8 new tokens, greedy): 4-bit NF4 (bitsandbytes; vision tower, bridge and head kept in bf16), int8 (bitsandbytes),
   and bf16 with `device_map="auto"`, `max_memory={"cpu": "8GiB"}` and disk offload; it reports load time, peak
   anonymous memory with VmHWM beside it, time to first token and decode tokens/s;
3. the same three loads of CPM-Bee alone (the chat folder's LLM) and of a `LlamaForCausalLM` of CPM-Bee-10B's widths,
   depth and vocabulary (the control), on a prompt as long as the chat's, and the ratios CPM-Bee / Llama;
4. VisCPM-Paint at release size, converted with `viscpm-convert paint` from a synthetic checkpoint (shapes from
   `viscpm_hf.convert.paint`): the CPM-Bee-10B text encoder in NF4 and the SD-2.1-base UNet in bf16, one 256x256
   image in 2 steps;
5. with a GPU (`torch.cuda.is_available()`), the loads again on it (NF4, int8, bf16) with peak GPU memory and decode
   tokens/s beside the bandwidth limit, and `bench_cpmbee.py --real-config`'s measurement of the released LLM;
6. where this process may make a memory cgroup (a systemd scope, a delegated cgroup v2 memory controller, or a writable
   cgroup v1 memory hierarchy), the NF4 chat load again inside an 8 GiB limit, which it must finish.

Memory is the peak of `RssAnon` (`/proc/self/status`, sampled every 50 ms by a thread): what a user's machine has to
find. The pages of memory-mapped safetensors are reclaimable page cache: `VmHWM` counts them and is shown beside it,
but the targets hold anonymous memory. Targets, at `--scale 1`: NF4 chat <= 8 GB, int8 chat <= 13 GB, offload <= 9.5
GB, Paint NF4 <= 9 GB, each CPM-Bee / Llama peak ratio <= 1.05, every answer well-formed (8 tokens, finite logits).

The release size needs about 45 GB of free disk (checked first) for a folder made under `--dir` (default: the current
folder; not a tmpfs, whose files are memory) and removed at the end, and about an hour of CPU. `--scale 0.05` shrinks
every width, depth and the vocabulary (and the offload budget with the weights) to run the pipeline end to end in a
few minutes; its memory figures are then mostly the Python process, not the model.

    python benchmarks/bench_release_memory.py                                # the release size
    python benchmarks/bench_release_memory.py --scale 0.05 --threads 1      # the pipeline end to end, in minutes
"""

import argparse
import ctypes
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from bench_cpmbee import _original_names, file_backed_tensor, memory_bandwidth
from diffusers import AutoencoderKL
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from viscpm_hf import (
    CpmBeeForCausalLM,
    CpmBeeModel,
    VisCPMChatCpmBeeForConditionalGeneration,
    VisCPMPaintPipeline,
    VisCPMTransBlock,
)
from viscpm_hf.convert.chat import (
    BEIT3_HEAD_WIDTH,
    BEIT3_LARGE,
    CPMBEE_10B,
    RELEASED_NUM_QUERY_TOKENS,
    chat_config_from_original,
    convert_chat_key,
)
from viscpm_hf.convert.checkpoint import parse_size, write_safetensors_shards
from viscpm_hf.convert.paint import (
    SD21_BASE_UNET,
    TRANSBLOCK_KEYS,
    TRANSBLOCK_LAYER_NORM_EPS,
    UNET_HEAD_WIDTH,
    build_unet,
    text_encoder_config,
)
from viscpm_hf.models.cpmbee.convert_cpmbee import convert_cpmbee_key


GB, GiB = 1e9, 2**30
NEW_TOKENS = 8
BUDGET = 8 * GiB  # the offload load's max_memory, and the cgroup's limit
QUESTION = "What is in this picture? Describe it."
PAINT_PROMPT = "a lighthouse on a cliff at dawn, watercolor"
LOADS = ("nf4", "int8", "offload")
MODELS = ("chat", "cpmbee", "llama")
TARGETS = {("chat", "nf4"): 8 * GB, ("chat", "int8"): 13 * GB, ("chat", "offload"): 9.5 * GB, ("paint", "nf4"): 9 * GB}
RATIO_TARGET = 1.05
# What stays in bf16 when the chat is quantized (the default BitsAndBytesConfig would quantize the tower and bridge).
CHAT_FULL_PRECISION = ["model.vision_tower", "model.bridge", "model.llm.lm_head"]
# SD-2.1-base's vae/config.json: the converter reads the user's VAE folder, so only this script describes it.
SD21_BASE_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "act_fn": "silu", "sample_size": 768, "scaling_factor": 0.18215,
}  # fmt: skip
VOCAB_SPECIALS = ["<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<root>", "<ans>"]


# --- memory ------------------------------------------------------------------------------------------------------


def process_status() -> dict[str, int]:
    """The `kB` fields of `/proc/self/status` in bytes (`RssAnon`, `VmHWM`, ...)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if value.strip().endswith(" kB"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def live_anon() -> int:
    """Anonymous memory once the allocator has given back what it keeps of freed blocks (glibc's `malloc_trim`): what
    live objects hold. The peak also counts what the allocator keeps, as the machine feels it."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
    return process_status()["RssAnon"]


class PeakMemory:
    """The peak of this process's anonymous memory, sampled every `interval` seconds by a daemon thread."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.baseline = self.peak = process_status()["RssAnon"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, process_status()["RssAnon"])

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        status = process_status()
        self.peak = max(self.peak, status["RssAnon"])
        return {"baseline_anon": self.baseline, "peak_anon": self.peak, "vm_hwm": status["VmHWM"]}


# --- the release's shapes, scaled --------------------------------------------------------------------------------


def scaled(value: int, scale: float, multiple: int) -> int:
    return max(multiple, round(value * scale / multiple) * multiple)


def release_description(scale: float) -> dict:
    """The original configs of the released models (the converter's), with every width, depth and the vocabulary
    times `scale`, rounded to whole heads and norm groups; the image size and the query count stay."""
    llm, vision, unet, vae = dict(CPMBEE_10B), dict(BEIT3_LARGE), dict(SD21_BASE_UNET), dict(SD21_BASE_VAE)
    if scale != 1:
        llm["dim_model"] = scaled(llm["dim_model"], scale, llm["dim_head"])
        llm["num_heads"] = llm["dim_model"] // llm["dim_head"]
        llm["dim_ff"] = scaled(llm["dim_ff"], scale, 64)
        llm["num_layers"] = max(1, round(llm["num_layers"] * scale))
        llm["vocab_size"] = max(len(VOCAB_SPECIALS) + 1000, round(llm["vocab_size"] * scale))
        vision["encoder_embed_dim"] = scaled(vision["encoder_embed_dim"], scale, BEIT3_HEAD_WIDTH)
        vision["encoder_attention_heads"] = vision["encoder_embed_dim"] // BEIT3_HEAD_WIDTH
        vision["encoder_ffn_embed_dim"] = scaled(vision["encoder_ffn_embed_dim"], scale, 64)
        vision["encoder_layers"] = max(1, round(vision["encoder_layers"] * scale))
        unet["block_out_channels"] = [scaled(width, scale, UNET_HEAD_WIDTH) for width in unet["block_out_channels"]]
        unet["attention_head_dim"] = [width // UNET_HEAD_WIDTH for width in unet["block_out_channels"]]
        unet["cross_attention_dim"] = scaled(unet["cross_attention_dim"], scale, UNET_HEAD_WIDTH)
        unet["layers_per_block"] = max(1, round(unet["layers_per_block"] * scale))
        groups = vae["norm_num_groups"]
        vae["block_out_channels"] = [scaled(width, scale, groups) for width in vae["block_out_channels"]]
        vae["layers_per_block"] = max(1, round(vae["layers_per_block"] * scale))
    return {"llm": llm, "vision": vision, "unet": unet, "vae": vae, "num_queries": RELEASED_NUM_QUERY_TOKENS}


def chat_original_shapes(release: dict) -> dict[str, tuple[int, ...]]:
    """`{original key: shape}` of a VisCPM-Chat checkpoint: what inference uses (the release also holds the MIM head
    and BEiT-3's text embedding, which the converter drops)."""
    config = chat_config_from_original(release["llm"], release["vision"], release["num_queries"])
    with torch.device("meta"):
        model = VisCPMChatCpmBeeForConditionalGeneration(config)
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    names = _original_names(release["llm"]["num_layers"], release["vision"]["encoder_layers"])
    return {name: shapes[convert_chat_key(name)] for name in names}


def paint_original_shapes(release: dict) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """`({original key: shape}` of a VisCPM-Paint checkpoint, `{key: shape}` of SD-2.1-base's VAE)."""
    text_config = text_encoder_config(release["llm"])
    unet = build_unet(release["unet"])
    with torch.device("meta"):
        text_encoder = CpmBeeModel(text_config).state_dict()
        transblock = VisCPMTransBlock(
            text_config.hidden_size, unet.config.cross_attention_dim, layer_norm_eps=TRANSBLOCK_LAYER_NORM_EPS
        ).state_dict()
        vae = AutoencoderKL.from_config(release["vae"]).state_dict()
    llm_names = [name for name in _original_names(release["llm"]["num_layers"], 0) if name.startswith("llm.")]
    shapes = {name: tuple(text_encoder[convert_cpmbee_key(name)].shape) for name in llm_names}
    shapes.update({f"unet.{key}": tuple(tensor.shape) for key, tensor in unet.state_dict().items()})
    shapes.update({original: tuple(transblock[new].shape) for original, new in TRANSBLOCK_KEYS.items()})
    return shapes, {key: tuple(tensor.shape) for key, tensor in vae.items()}


def llama_config(release: dict) -> LlamaConfig:
    """The control: a Llama of CPM-Bee's widths, depth and vocabulary, its head tied to the embeddings as CPM-Bee's."""
    llm = release["llm"]
    return LlamaConfig(
        vocab_size=llm["vocab_size"], hidden_size=llm["dim_model"], intermediate_size=llm["dim_ff"],
        num_hidden_layers=llm["num_layers"], num_attention_heads=llm["num_heads"], num_key_value_heads=llm["num_heads"],
        head_dim=llm["dim_head"], tie_word_embeddings=True, max_position_embeddings=4096, dtype="bfloat16",
        architectures=["LlamaForCausalLM"], pad_token_id=0, bos_token_id=6, eos_token_id=7,
    )  # fmt: skip


def bf16_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    return 2 * sum(math.prod(shape) for shape in shapes.values())


# --- the synthetic files -----------------------------------------------------------------------------------------


def random_block(dtype: torch.dtype, numel: int = 2**24) -> torch.Tensor:
    """Random values (std 0.02, as initialisers draw them) that the files repeat: random enough, and written fast."""
    return (torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)


def write_original_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A float16 `torch.save` checkpoint (one storage per tensor, as the release's) of file-backed tensors, so that
    writing it needs no memory of its size; their scratch files need as much disk as the checkpoint meanwhile."""
    scratch = path.parent / f"{path.stem}.scratch"
    scratch.mkdir()
    block = random_block(torch.float16)
    state = {
        name: file_backed_tensor(scratch / f"{index}.bin", shape, block)
        for index, (name, shape) in enumerate(shapes.items())
    }
    torch.save(state, path)
    del state
    shutil.rmtree(scratch)


def write_random_safetensors(folder: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, prefix: str) -> None:
    """Safetensors shards of random tensors, streamed by the converter's writer (no tensor is ever whole in memory)."""
    block = random_block(dtype)
    entries = [(name, shape, dtype) for name, shape in shapes.items()]

    def read(index: int):
        numel = math.prod(entries[index][1])
        for start in range(0, numel, block.numel()):
            yield block[: min(block.numel(), numel - start)]

    write_safetensors_shards(folder, entries, read, parse_size("1GB"), prefix=prefix)


def write_vocab(path: Path, size: int) -> None:
    path.write_text("\n".join(VOCAB_SPECIALS + [f"t{i}" for i in range(len(VOCAB_SPECIALS), size)]) + "\n")


# --- the workers, each run in a fresh process ----------------------------------------------------------------------


class TokenClock:
    """A stopping criterion that never stops: it notes when each new token has been chosen."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def quantization_config(mode: str, skip: list[str]) -> BitsAndBytesConfig:
    if mode == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=skip,
        )  # fmt: skip
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def load_kwargs(mode: str, skip: list[str], device: str, budget: int, offload_folder: str) -> dict:
    kwargs = {"dtype": torch.bfloat16}
    if mode in ("nf4", "int8"):
        kwargs.update(quantization_config=quantization_config(mode, skip), device_map={"": device})
    elif device == "cuda":  # bf16 on the GPU, whole
        kwargs.update(device_map={"": "cuda"})
    else:
        kwargs.update(device_map="auto", max_memory={"cpu": budget}, offload_folder=offload_folder)
    return kwargs


def quantized_linears(module: torch.nn.Module) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in module.modules())


def placement(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of parameters per device; an offloaded parameter waits on the meta device: "disk"."""
    where = {}
    for parameter in model.parameters():
        device = "disk" if parameter.device.type == "meta" else str(parameter.device)
        where[device] = where.get(device, 0) + parameter.nbytes
    return where


def load_model(task: dict):
    """The model of `task`, loaded its way, and the chat's processor (None for the text-only models)."""
    kind, folder = task["model"], task["folder"]
    skip = CHAT_FULL_PRECISION if kind == "chat" else ["lm_head"]
    kwargs = load_kwargs(task["mode"], skip, task["device"], task["budget"], task["offload_folder"])
    if kind == "chat":
        return AutoModelForImageTextToText.from_pretrained(folder, **kwargs), AutoProcessor.from_pretrained(folder)
    if kind == "llama":
        return LlamaForCausalLM.from_pretrained(folder, **kwargs), None
    # CPM-Bee alone: the chat folder's LLM; its other tensors (tower, bridge) are left unread.
    config = AutoConfig.from_pretrained(folder).text_config
    model, info = CpmBeeForCausalLM.from_pretrained(
        folder, config=config, key_mapping={r"^model\.llm\.": ""}, strict=False, output_loading_info=True, **kwargs
    )
    if info["missing_keys"]:
        raise RuntimeError(f"CPM-Bee's tensors missing from the chat folder: {sorted(info['missing_keys'])[:5]}")
    return model, None


def worker_load(task: dict) -> dict:
    """Loads one model one way and generates NEW_TOKENS greedy tokens; the chat answers a question about an image."""
    torch.set_num_threads(task["threads"])
    cuda = task["device"] == "cuda"
    memory = PeakMemory()
    start = time.perf_counter()
    model, processor = load_model(task)
    model.eval()
    result = {
        "load_s": time.perf_counter() - start, "footprint": model.get_memory_footprint(), "placement": placement(model),
        "load_peak_anon": memory.peak, "live_anon": live_anon(),
    }  # fmt: skip
    if processor is not None:
        if task["mode"] in ("nf4", "int8"):
            result["quantized_in_llm"] = quantized_linears(model.model.llm)
            result["quantized_in_vision_and_bridge"] = quantized_linears(model.model.vision_tower) + quantized_linears(
                model.model.bridge
            )
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
        content = [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]
        messages = [{"role": "user", "content": content}]
        inputs = dict(
            processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        )
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    else:
        shape, generator = (1, task["prompt_length"]), torch.Generator().manual_seed(0)
        ids = torch.randint(len(VOCAB_SPECIALS), model.config.vocab_size, shape, generator=generator)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if cuda:
        inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        torch.cuda.synchronize()
    clock = TokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
            stopping_criteria=[clock], output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    prompt_length = inputs["input_ids"].shape[1]
    result.update(
        prompt_length=prompt_length, new_tokens=output.sequences.shape[1] - prompt_length,
        finite_logits=bool(all(torch.isfinite(step).all() for step in output.logits)), ttft_s=clock.times[0] - start,
        tokens_per_s=(len(clock.times) - 1) / (clock.times[-1] - clock.times[0]),
    )  # fmt: skip
    if processor is not None:
        result["answer"] = processor.decode(output.sequences[0, prompt_length:], skip_special_tokens=True)
    if cuda:
        result["peak_gpu"] = torch.cuda.max_memory_allocated()
        result["bandwidth_limit_tokens_per_s"] = memory_bandwidth(torch.device("cuda")) / result["footprint"]
    result.update(memory.stop())
    return result


def worker_paint(task: dict) -> dict:
    """Loads the Paint folder with its text encoder in NF4 and paints one 256x256 image in 2 steps."""
    torch.set_num_threads(task["threads"])
    device = task["device"]
    memory = PeakMemory()
    start = time.perf_counter()
    folder = Path(task["folder"])
    text_encoder = CpmBeeModel.from_pretrained(
        folder / "text_encoder", dtype=torch.bfloat16, device_map={"": device},
        quantization_config=quantization_config("nf4", []),
    )  # fmt: skip
    pipe = VisCPMPaintPipeline.from_pretrained(folder, text_encoder=text_encoder, torch_dtype=torch.bfloat16)
    if device != "cpu":
        pipe.to(device)  # the quantized text encoder is there already
    pipe.set_progress_bar_config(disable=True)
    result = {"load_s": time.perf_counter() - start, "load_peak_anon": memory.peak, "live_anon": live_anon()}
    start = time.perf_counter()
    with torch.inference_mode():
        image = pipe(
            PAINT_PROMPT, height=256, width=256, num_inference_steps=2, output_type="np",
            generator=torch.Generator(device).manual_seed(0),
        ).images[0]  # fmt: skip
    others = sum(p.nbytes for name in ("unet", "vae", "transblock") for p in getattr(pipe, name).parameters())
    result.update(
        paint_s=time.perf_counter() - start, image_shape=list(image.shape), finite_image=bool(np.isfinite(image).all()),
        quantized_in_text_encoder=quantized_linears(text_encoder),
        footprint=text_encoder.get_memory_footprint() + others,
    )  # fmt: skip
    if device == "cuda":
        result["peak_gpu"] = torch.cuda.max_memory_allocated()
    result.update(memory.stop())
    return result


def worker_convert(task: dict) -> dict:
    """`viscpm-convert` with `task["argv"]`, as its console script runs it."""
    from viscpm_hf.convert.cli import main

    memory = PeakMemory()
    start = time.perf_counter()
    if main(task["argv"]):
        raise SystemExit("viscpm-convert failed")
    return {"seconds": time.perf_counter() - start, **memory.stop()}


def worker_write(task: dict) -> dict:
    """Writes the synthetic inputs of one stage: the chat or paint checkpoint (and SD's VAE), or the Llama folder."""
    memory = PeakMemory()
    start = time.perf_counter()
    release, work = task["release"], Path(task["work"])
    if task["what"] == "chat":
        write_original_checkpoint(work / "viscpm_chat_synthetic.pt", chat_original_shapes(release))
    elif task["what"] == "paint":
        shapes, vae_shapes = paint_original_shapes(release)
        write_original_checkpoint(work / "viscpm_paint_synthetic.pt", shapes)
        (work / "vae").mkdir()
        (work / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **release["vae"]}))
        write_random_safetensors(work / "vae", vae_shapes, torch.float32, "diffusion_pytorch_model")
    else:
        config = llama_config(release)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        tied = set(model.all_tied_weights_keys)
        shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items() if key not in tied}
        (work / "llama").mkdir()
        write_random_safetensors(work / "llama", shapes, torch.bfloat16, "model")
        config.save_pretrained(work / "llama")
    return {"seconds": time.perf_counter() - start, **memory.stop()}


WORKERS = {"load": worker_load, "paint": worker_paint, "convert": worker_convert, "write": worker_write}


def run_worker(task: dict, limit: dict | None = None, timeout: float | None = None) -> dict:
    """Runs `task` in a fresh Python process (inside a `memory_limit` if given): its result, or `{"error": why}`."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]
    join_cgroup = None
    if limit and "prefix" in limit:
        command = [*limit["prefix"], *command]
    elif limit:
        procs = limit["cgroup"] / "cgroup.procs"

        def join_cgroup():  # before Python starts, so that every page of the load is charged to the cgroup
            procs.write_text(str(os.getpid()))

    try:
        done = subprocess.run(
            command, capture_output=True, text=True, preexec_fn=join_cgroup, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    killed = " (killed: out of memory?)" if done.returncode in (-9, 137) else ""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return {"error": f"exit {done.returncode}{killed}: " + " | ".join(lines[-3:])[-600:]}


# --- a memory limit ----------------------------------------------------------------------------------------------


def memory_limit(limit: int) -> tuple[dict | None, str]:
    """How to run a process inside `limit` bytes: `{"prefix": command}` (a systemd scope) or `{"cgroup": path}` (a
    new cgroup below this process's own, v2 or v1), swap off where it can be; or `(None, why not)`."""
    if shutil.which("systemd-run") and Path("/run/systemd/system").is_dir():
        user = [] if os.geteuid() == 0 else ["--user"]
        prefix = ["systemd-run", *user, "--scope", "--quiet", "-p", f"MemoryMax={limit}", "-p", "MemorySwapMax=0"]
        if subprocess.run([*prefix, "true"], capture_output=True, check=False).returncode == 0:
            return {"prefix": prefix}, ""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as error:
        return None, f"no /proc/self/cgroup ({error})"
    why = "no memory controller is delegated to this process (no systemd scope, cgroup v2 or v1 memory to write)"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: a child gets the memory controller only if this cgroup hands it down
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            subtree = base / "cgroup.subtree_control"
            if not subtree.exists() or "memory" not in subtree.read_text().split():
                continue
            limit_file, swap_file, swap_value = "memory.max", "memory.swap.max", "0"
        elif "memory" in controllers.split(","):  # cgroup v1
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit_file, swap_file, swap_value = "memory.limit_in_bytes", "memory.memsw.limit_in_bytes", str(limit)
        else:
            continue
        group = base / f"viscpm-bench-{os.getpid()}"
        try:
            group.mkdir()
            (group / limit_file).write_text(str(limit))
        except OSError as error:
            if group.is_dir():
                group.rmdir()
            why = f"cannot make a memory cgroup under {base} ({error})"
            continue
        try:
            (group / swap_file).write_text(swap_value)
        except OSError:
            pass  # no swap accounting: the limit still holds anonymous memory and page cache
        return {"cgroup": group}, ""
    return None, why


# --- the run ------------------------------------------------------------------------------------------------------


def check_free_disk(parent: Path, needed: int) -> None:
    free = shutil.disk_usage(parent).free
    print(f"disk: {free / GB:.1f} GB free under {parent}, about {needed / GB:.1f} GB needed at the peak")
    if free < needed:
        raise SystemExit(
            f"error: not enough free disk under {parent}: {free / GB:.1f} GB free, about {needed / GB:.1f} GB needed. "
            "Pass --dir on a larger file system (not a tmpfs), or a smaller --scale."
        )
    with open("/proc/mounts") as mounts:
        memory_mounts = [fields[1] for fields in map(str.split, mounts) if fields[2] in ("tmpfs", "ramfs")]
    if any(parent == Path(mount) or Path(mount) in parent.parents for mount in memory_mounts):
        print(f"warning: {parent} is on a tmpfs: its files are memory, and the loads will not read from a disk as a "
              "user's do. Pass --dir on a disk.")  # fmt: skip


def progress(name: str, result: dict) -> None:
    if "error" in result:
        print(f"{name}: {result['error']}", flush=True)
    else:
        took = result.get("load_s", result.get("seconds", 0)) + result.get("paint_s", 0)
        print(f"{name}: {took:.1f} s, peak anonymous memory {result['peak_anon'] / GB:.2f} GB", flush=True)


def convert(work: Path, kind: str, checkpoint: Path, output: Path, results: dict) -> bool:
    """`viscpm-convert {kind}` of `checkpoint` to bf16 in a fresh process, which then deletes the checkpoint."""
    argv = [kind, "--checkpoint", str(checkpoint), "--vocab", str(work / "bee.txt"), "--output", str(output)]
    argv += ["--vae", str(work / "vae")] if kind == "paint" else []
    result = run_worker({"worker": "convert", "argv": [*argv, "--dtype", "bfloat16"]})
    results[f"convert {kind}"] = {**result, "size": checkpoint.stat().st_size}
    checkpoint.unlink()
    progress(f"convert {kind}", result)
    return "error" not in result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scale", type=float, default=1.0,
        help="times every width, depth and the vocabulary, and the offload budget with the weights (default 1: the "
        "release; 0.05 runs in minutes)",
    )  # fmt: skip
    parser.add_argument("--dir", default=".", help="where to make the temporary folder (default: here; not a tmpfs)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder, to look into it")
    parser.add_argument("--threads", type=int, help="torch threads of each load (default: torch's own count)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models to load")
    parser.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS), help="which ways to load them")
    parser.add_argument("--no-paint", action="store_true", help="skip VisCPM-Paint")
    parser.add_argument(
        "--cgroup", choices=["auto", "off"], default="auto",
        help="run the NF4 chat load again inside an 8 GiB memory cgroup, where this process may make one (default)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed to each load (default 3600)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        task = json.loads(args.worker)
        print("RESULT " + json.dumps(WORKERS[task.pop("worker")](task)), flush=True)
        return

    threads = args.threads or torch.get_num_threads()
    release = release_description(args.scale)
    chat_bytes = bf16_bytes(chat_original_shapes(release))
    paint_shapes, vae_shapes = paint_original_shapes(release)
    paint_bytes = bf16_bytes(paint_shapes)
    # The same share of the weights in memory at every scale as 8 GiB of the release's.
    budget = round(BUDGET * chat_bytes / bf16_bytes(chat_original_shapes(release_description(1))))
    llm, vision = release["llm"], release["vision"]
    print(f"torch {torch.__version__}, {threads} threads; scale {args.scale:g}: CPM-Bee {llm['dim_model']} wide, "
          f"{llm['num_layers']} layers, vocabulary {llm['vocab_size']}; BEiT-3 {vision['encoder_embed_dim']} wide, "
          f"{vision['encoder_layers']} layers; chat {chat_bytes / GB:.2f} GB in bf16, paint {paint_bytes / GB:.2f} GB; "
          f"offload budget {budget / GiB:.3g} GiB")  # fmt: skip
    if args.scale != 1:
        print(f"(at scale {args.scale:g} the memory figures are mostly the Python process's; the targets are for "
              "the release)")  # fmt: skip
    parent = Path(args.dir).resolve()
    # The peak of disk: a stage's synthetic checkpoint beside its scratch files, or beside its conversion.
    check_free_disk(parent, round(2.1 * max(chat_bytes, paint_bytes) + 4 * bf16_bytes(vae_shapes) + 0.5 * GB))
    work = Path(tempfile.mkdtemp(prefix="viscpm-release-memory-", dir=parent))
    results = {}
    try:
        write_vocab(work / "bee.txt", llm["vocab_size"])
        common = {"release": release, "work": str(work)}

        # 1. The chat checkpoint and its conversion.
        written = run_worker({"worker": "write", "what": "chat", **common})
        if "error" in written:
            raise SystemExit(f"error: writing the synthetic chat checkpoint failed: {written['error']}")
        chat_folder = work / "viscpm-chat"
        if not convert(work, "chat", work / "viscpm_chat_synthetic.pt", chat_folder, results):
            raise SystemExit("error: the chat conversion failed: nothing to load")

        # 2-3. The loads, each in a fresh process; the chat's first, its prompt length is the others'.
        offload, prompt_length = work / "offload", None
        gpu_loads = [("cuda", mode) for mode in ("nf4", "int8", "bf16")] if torch.cuda.is_available() else []
        for model in sorted(args.models, key=MODELS.index):
            if model == "llama":
                shutil.rmtree(chat_folder)  # its disk, for the Llama folder
                written = run_worker({"worker": "write", "what": "llama", **common})
                if "error" in written:
                    print(f"writing the Llama folder failed: {written['error']}")
            for device, mode in [("cpu", mode) for mode in args.loads] + gpu_loads:
                name = f"{model} {mode}" + (" cuda" if device == "cuda" else "")
                task = {"worker": "load", "model": model, "mode": mode, "device": device,
                        "folder": str(work / "llama" if model == "llama" else chat_folder), "budget": budget,
                        "offload_folder": str(offload), "prompt_length": prompt_length or 96,
                        "threads": threads}  # fmt: skip
                results[name] = run_worker(task, timeout=args.timeout)
                if offload.exists():
                    results[name]["offloaded_bytes"] = sum(f.stat().st_size for f in offload.rglob("*") if f.is_file())
                    shutil.rmtree(offload)
                prompt_length = prompt_length or results[name].get("prompt_length")
                progress(name, results[name])
                if name == "chat nf4" and args.cgroup == "auto":
                    limit = BUDGET if args.scale == 1 else results[name].get("baseline_anon", 0) + budget
                    results["chat nf4 in cgroup"] = limited_run(task, limit, args.timeout)
                    progress("chat nf4 in cgroup", results["chat nf4 in cgroup"])
        shutil.rmtree(work / "llama", ignore_errors=True)
        shutil.rmtree(chat_folder, ignore_errors=True)  # the disk for Paint's checkpoint and its conversion

        # 4. Paint.
        if not args.no_paint:
            written = run_worker({"worker": "write", "what": "paint", **common})
            paint_folder = work / "viscpm-paint"
            if "error" in written:
                results["convert paint"] = written
            elif convert(work, "paint", work / "viscpm_paint_synthetic.pt", paint_folder, results):
                for device in ["cpu"] + ["cuda"] * torch.cuda.is_available():
                    name = "paint nf4" + (" cuda" if device == "cuda" else "")
                    task = {"worker": "paint", "folder": str(paint_folder), "device": device, "threads": threads}
                    results[name] = run_worker(task, timeout=args.timeout)
                    progress(name, results[name])

        # 5. The released LLM on the GPU (the loads on it ran beside the CPU's).
        if torch.cuda.is_available():
            if args.scale == 1:
                real_config_on_gpu()
            else:
                print("GPU: bench_cpmbee.py --real-config builds the released 10B whatever the scale: run --scale 1")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(args, results)


def limited_run(task: dict, limit: int, timeout: float) -> dict:
    how, why = memory_limit(limit)
    if how is None:
        return {"error": f"not run: {why}"}
    try:
        return {**run_worker(task, how, timeout), "limit": limit}
    finally:
        if "cgroup" in how:
            how["cgroup"].rmdir()


def real_config_on_gpu() -> None:
    """bench_cpmbee.py --real-config's measurement (the released LLM in bf16 and NF4 on the GPU), in a fresh process."""
    code = (
        "import argparse, sys; sys.path.insert(0, sys.argv[1]); import bench_cpmbee; "
        "bench_cpmbee.real_scale(argparse.Namespace(tokens=32, repeats=3))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True, check=False
    )
    print("bench_cpmbee.py --real-config:\n" + done.stdout + (done.stderr[-1500:] if done.returncode else ""))


def gb(value) -> str:
    return f"{value / GB:7.2f}" if isinstance(value, (int, float)) else f"{'-':>7}"


def number(value, digits: int = 1) -> str:
    return f"{value:7.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>7}"


def notes(result: dict) -> str:
    said = []
    if "new_tokens" in result:
        said.append(f"{result['new_tokens']} tokens, {'finite' if result['finite_logits'] else 'NON-FINITE'} logits")
    if "quantized_in_llm" in result:
        said.append(f"quantized Linears: LLM {result['quantized_in_llm']}, tower + bridge "
                    f"{result['quantized_in_vision_and_bridge']}")  # fmt: skip
    if "offloaded_bytes" in result:
        where = ", ".join(f"{place} {size / GB:.2f} GB" for place, size in result["placement"].items())
        said.append(f"weights on {where}; offload folder {result['offloaded_bytes'] / GB:.2f} GB")
    if "size" in result:
        above = (result["peak_anon"] - result["baseline_anon"]) / result["size"]
        said.append(f"checkpoint {result['size'] / GB:.2f} GB; anon above the baseline {above:.3f}x its size")
    if "paint_s" in result:
        finite = "finite" if result["finite_image"] else "NON-FINITE"
        said.append(f"{finite} {result['image_shape']} image in {result['paint_s']:.1f} s")
    if "peak_gpu" in result:
        said.append(f"peak GPU {result['peak_gpu'] / GiB:.2f} GiB")
    if "bandwidth_limit_tokens_per_s" in result:
        said.append(f"bandwidth limit {result['bandwidth_limit_tokens_per_s']:.1f} tok/s")
    if "limit" in result:
        said.append(f"ran to the end inside a {result['limit'] / GiB:.2f} GiB memory cgroup")
    return "; ".join(said)


def report(args, results: dict) -> None:
    print(f"\n=== scale {args.scale:g}: peak anonymous memory (RssAnon, sampled every 50 ms), VmHWM beside it ===")
    header = (f"{'run':<20}{'load s':>8}{'anon GB':>8}{'HWM GB':>8}{'+base':>8}{'live+':>8}{'weights':>8}"
              f"{'TTFT s':>8}{'tok/s':>8}  notes")  # fmt: skip
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<20}  {r['error']}")
            continue
        above = r["peak_anon"] - r["baseline_anon"]
        live = r["live_anon"] - r["baseline_anon"] if "live_anon" in r else None
        load = r.get("load_s", r.get("seconds"))
        print(f"{name:<20}{number(load)} {gb(r['peak_anon'])} {gb(r['vm_hwm'])} {gb(above)} {gb(live)} "
              f"{gb(r.get('footprint'))}{number(r.get('ttft_s'), 2)}{number(r.get('tokens_per_s'))}  "
              + notes(r))  # fmt: skip
    print("anon: the process's peak RssAnon; HWM: its VmHWM (peak RSS, mapped file pages included); +base: the anon "
          "peak above the process before loading; live+: what stays once loaded, after gc and malloc_trim (the rest "
          "of +base passed, or was kept by the allocator); weights: the model's footprint")  # fmt: skip

    print("\nratios (peak anonymous memory; load time; decode tokens/s):")
    ratios = {}
    for mode in LOADS:
        llama = results.get(f"llama {mode}", {})
        for model, label in (("cpmbee", "CPM-Bee / Llama"), ("chat", "VisCPM-Chat / Llama (BEiT-3 and bridge too)")):
            ours = results.get(f"{model} {mode}", {})
            if "peak_anon" in ours and "peak_anon" in llama:
                ratio = ours["peak_anon"] / llama["peak_anon"]
                if model == "cpmbee":
                    ratios[mode] = ratio
                print(f"  {mode:<8} {label}: memory {ratio:.3f}, load time {ours['load_s'] / llama['load_s']:.3f}, "
                      f"decode {ours['tokens_per_s'] / llama['tokens_per_s']:.3f}")  # fmt: skip

    release = "" if args.scale == 1 else f"; at scale {args.scale:g}, not the release's figures"
    print(f"\ntargets (peak anonymous memory of the process{release}):")
    for (model, mode), target in TARGETS.items():
        r = results.get(f"{model} {mode}", {})
        well_formed = r.get("finite_logits", r.get("finite_image")) and r.get("new_tokens", NEW_TOKENS) == NEW_TOKENS
        if "peak_anon" in r:
            verdict = "pass" if r["peak_anon"] <= target and well_formed else "MISS"
            print(f"  {model} {mode:<8} <= {target / GB:g} GB: {r['peak_anon'] / GB:.2f} GB  {verdict}")
        else:
            print(f"  {model} {mode:<8} <= {target / GB:g} GB: {r.get('error', 'not run')}")
    for mode in LOADS:
        if mode in ratios:
            verdict = "pass" if ratios[mode] <= RATIO_TARGET else "MISS"
            print(f"  CPM-Bee / Llama peak, {mode:<8} <= {RATIO_TARGET}: {ratios[mode]:.3f}  {verdict}")
        else:
            print(f"  CPM-Bee / Llama peak, {mode:<8} <= {RATIO_TARGET}: not measured")
    if "chat nf4 in cgroup" in results:
        print(f"  chat nf4 inside 8 GiB: {results['chat nf4 in cgroup'].get('error', 'ran to the end')}")


if __name__ == "__main__":
    main()
