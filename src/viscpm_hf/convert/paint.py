"""Converts a released VisCPM-Paint checkpoint (balance / zhplus) into a diffusers pipeline folder.

The original file is one flat state dict: `llm.*` (CPM-Bee, the text encoder), `unet.*` (a Stable Diffusion 2.1-base
UNet under diffusers names) and `trans_block.*` (LLM width -> cross-attention width). The VAE is not in it: it is
SD-2.1-base's, read from a local diffusers `vae/` folder. Every tensor is streamed into the safetensors shards of
its component. The sizes of the text encoder and the UNet are read from the tensors' shapes (the VAE's are checked
against its config.json); names and shapes are checked against the components built on the meta device before
anything is written, and the folder appears only once complete. The tokenizer is saved in its caption format (the
original's `{'caption': prompt, 'objects': ''}` prompts); the caption limit is both its model_max_length and the text
encoder's max_position_embeddings, so longer prompts are truncated to it whatever tokenizer the folder is used with.
"""

import json
import os
import re
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn

from ..models.cpmbee import CpmBeeModel, CpmBeeTokenizer
from ..models.cpmbee.configuration_cpmbee import CpmBeeConfig
from ..models.cpmbee.convert_cpmbee import convert_cpmbee_key, cpmbee_config_from_original
from ..models.cpmbee.prompt_cpmbee import MAX_CAPTION_TOKENS
from ..pipelines.viscpm_paint.transblock import VisCPMTransBlock
from .chat import CPMBEE_10B, check_vocabulary
from .checkpoint import (
    FiniteCheck,
    OriginalCheckpoint,
    atomic_output_folder,
    check_floating,
    parse_size,
    prepare_output,
    refuse_output_over_inputs,
    write_safetensors_shards,
)
from .model_card import write_model_card
from .sizes import merge_sizes, read_cpmbee_sizes, read_unet_sizes, read_vae_sizes


# stabilityai/stable-diffusion-2-1-base unet/config.json (512 px); the released UNet weights have this layout. A
# conversion reads the channels, blocks and cross-attention width from the checkpoint; the rest comes from here.
SD21_BASE_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "dual_cross_attention": False,
    "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "upcast_attention": False,
}  # fmt: skip
# SD-2.1-base's scheduler values in a DDPM scheduler, as the original samples. steps_offset is 0 because the
# diffusers release VisCPM ran on (0.15) ignored it for DDPM: 50 steps are 980, 960, ..., 0 (4 steps: 750 ... 0).
SD21_BASE_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0,
}  # fmt: skip
# Not DDPM settings, but kept in its config so that `DDIMScheduler.from_config(...)` / PNDM get SD-2.1's values
# (DDIM's default set_alpha_to_one=True would change the last step).
SD21_BASE_SCHEDULER_EXTRAS = {"set_alpha_to_one": False, "skip_prk_steps": True}
# SD-2.x attention heads are 64 wide (`attention_head_dim` [5, 10, 20, 20] counts heads, for widths 320 ... 1280).
UNET_HEAD_WIDTH = 64
VAE_SCALING_FACTOR = 0.18215  # the SD-2.1 VAE the UNet was trained with
TRANSBLOCK_KEYS = {
    "trans_block.w_out_res.weight": "projection.weight",
    "trans_block.layernorm.weight": "layer_norm.weight",
    "trans_block.layernorm.bias": "layer_norm.bias",
}
TRANSBLOCK_LAYER_NORM_EPS = 1e-6
MODEL_INDEX = {
    "_class_name": "VisCPMPaintPipeline",
    "tokenizer": ["viscpm_hf", "CpmBeeTokenizer"],
    "text_encoder": ["viscpm_hf", "CpmBeeModel"],
    "transblock": ["viscpm_hf", "VisCPMTransBlock"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "reranker": [None, None],
    "reranker_processor": [None, None],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
}
# Weight file prefix per component: transformers models write `model*.safetensors`, diffusers models
# `diffusion_pytorch_model*.safetensors`.
WEIGHTS_PREFIX = {"text_encoder": "model", "transblock": "diffusion_pytorch_model", "unet": "diffusion_pytorch_model",
                  "vae": "diffusion_pytorch_model"}  # fmt: skip
SD21_VAE_HINT = (
    "The VAE is not part of the VisCPM-Paint checkpoint: pass the vae/ folder of stabilityai/stable-diffusion-2-1-base "
    "(config.json and diffusion_pytorch_model.safetensors)."
)
# Attention names of VAEs saved by diffusers < 0.14 (SD-2.1's files among them) -> current names.
_OLD_VAE_ATTENTION = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")
_NEW_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def text_encoder_config(llm: dict | None = None) -> CpmBeeConfig:
    config = cpmbee_config_from_original(llm or CPMBEE_10B)
    config.architectures = ["CpmBeeModel"]
    config.use_cache = False  # an encoder: one forward per prompt, nothing to continue
    # Relative positions set no limit of their own. The original's LLM read at most MAX_CAPTION_TOKENS prompt tokens
    # (VisCPM-Chat's max_inp_length; chat's 3514 adds the answer, which an encoder never reads): without it a
    # 20,000-character prompt costs gigabytes of attention.
    config.max_position_embeddings = MAX_CAPTION_TOKENS
    return config


def unet_config_from_checkpoint(shapes: dict[str, tuple[int, ...]], given: dict | None, source: str) -> dict:
    """The UNet config: SD-2.1-base's, then `given` (--unet-config), then the sizes the `unet.*` shapes tell."""
    config = merge_sizes(read_unet_sizes(shapes, prefix="unet."), given, SD21_BASE_UNET, "--unet-config", source)
    if not {"attention_head_dim", "num_attention_heads"} & set(given or {}):
        widths = config["block_out_channels"]
        if any(width % UNET_HEAD_WIDTH for width in widths):
            raise ValueError(
                f"The UNet of {source} has blocks {list(widths)} wide, not multiples of SD-2.1's head width "
                f"{UNET_HEAD_WIDTH}, and its attention heads show in no shape: give `attention_head_dim` in "
                "--unet-config (a diffusers unet/config.json)."
            )
        config["attention_head_dim"] = [width // UNET_HEAD_WIDTH for width in widths]
    return config


def build_unet(config: dict | None = None) -> UNet2DConditionModel:
    """The UNet on the meta device, from a diffusers `unet/config.json` dict (default: SD-2.1-base)."""
    config = dict(config or SD21_BASE_UNET)
    class_name = config.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        raise ValueError(f"--unet-config describes a {class_name}; VisCPM-Paint uses a UNet2DConditionModel config.")
    if not isinstance(config.get("cross_attention_dim", 1280), int):
        raise ValueError(
            f"The UNet's cross_attention_dim must be one number (the transblock's output width), got "
            f"{config['cross_attention_dim']!r}."
        )
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def find_vae(path: str | os.PathLike) -> tuple[Path, Path]:
    """`(folder, weights file)` of a diffusers VAE folder; the root of a Stable Diffusion repo is accepted too."""
    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not folder.is_dir():
        raise FileNotFoundError(f"VAE folder not found: {str(path)!r}. {SD21_VAE_HINT}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"No config.json in the VAE folder {str(folder)!r}. {SD21_VAE_HINT}")
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".ckpt"))
        if pickled:
            raise ValueError(
                f"The VAE folder {str(folder)!r} holds pickled weights only ({', '.join(pickled)}); they are not "
                "loaded, since unpickling can run code. Use the diffusion_pytorch_model.safetensors of the same "
                "release (stabilityai/stable-diffusion-2-1-base ships one)."
            )
        raise FileNotFoundError(
            f"No diffusion_pytorch_model.safetensors in the VAE folder {str(folder)!r}. {SD21_VAE_HINT}"
        )
    return folder, weights


def build_vae(
    folder: Path, unet: UNet2DConditionModel, shapes: dict[str, tuple[int, ...]] | None = None
) -> AutoencoderKL:
    """The VAE of `folder/config.json` on the meta device, after checking it suits the UNet and the original, and
    that its sizes agree with the weights' `shapes` if given."""
    try:
        config = AutoencoderKL.load_config(folder)
    except (OSError, ValueError) as error:
        raise ValueError(f"{str(folder / 'config.json')!r} is not a readable diffusers config ({error}).") from error
    if shapes is not None:
        config = merge_sizes(read_vae_sizes(shapes), config, {}, f"{str(folder / 'config.json')!r}", "its weights")
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(f"{str(folder)!r} holds a {class_name}, not an AutoencoderKL. {SD21_VAE_HINT}")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    if vae.config.scaling_factor != VAE_SCALING_FACTOR:
        raise ValueError(
            f"The VAE's scaling_factor is {vae.config.scaling_factor}, but VisCPM-Paint's UNet was trained on latents "
            f"of SD-2.1's VAE, scaled by {VAE_SCALING_FACTOR}. {SD21_VAE_HINT}"
        )
    if vae.config.latent_channels != unet.config.in_channels:
        raise ValueError(
            f"The VAE has {vae.config.latent_channels} latent channels but the UNet takes {unet.config.in_channels}."
        )
    return vae


def convert_paint_key(original_key: str) -> tuple[str, str] | None:
    """Original key -> `(component, key in that component)`, or None for a key of no component."""
    if original_key.startswith("llm."):
        try:
            return "text_encoder", convert_cpmbee_key(original_key)
        except KeyError:
            return None
    if original_key.startswith("unet."):
        return "unet", original_key.removeprefix("unet.")
    if original_key in TRANSBLOCK_KEYS:
        return "transblock", TRANSBLOCK_KEYS[original_key]
    return None


def convert_vae_key(key: str) -> tuple[str, str]:
    match = _OLD_VAE_ATTENTION.fullmatch(key)
    if match:
        key = f"{match.group(1)}.{_NEW_VAE_ATTENTION[match.group(2)]}.{match.group(3)}"
    return "vae", key


def plan_conversion(checkpoint, components: dict[str, nn.Module], convert_key=convert_paint_key, hint: str = ""):
    """`{component: [(original key, new key), ...]}` after checking every name and shape against `components`.

    `checkpoint` needs `keys()`, `shape(key)` and `path`; the components are built on the meta device. All problems
    (missing, unexpected and misshapen keys) are reported in one `ValueError`.
    """
    expected = {
        name: {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}
        for name, module in components.items()
    }
    plan = {name: [] for name in components}
    unexpected, wrong_shapes, seen = [], [], set()
    for key in checkpoint.keys():
        target = convert_key(key)
        if target is None or target[0] not in expected or target[1] not in expected[target[0]]:
            unexpected.append(key)
            continue
        component, new_key = target
        seen.add(target)
        if checkpoint.shape(key) != expected[component][new_key]:
            wrong_shapes.append(f"{key}: {checkpoint.shape(key)} (expected {expected[component][new_key]})")
        else:
            plan[component].append((key, new_key))
    missing = [f"{name}: {key}" for name, keys in expected.items() for key in keys if (name, key) not in seen]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}, converted names): {missing[:10]}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}")
    if wrong_shapes:
        problems.append(f"wrong shapes ({len(wrong_shapes)}): {wrong_shapes[:10]}")
    if problems:
        raise ValueError(f"{str(checkpoint.path)!r} does not match the expected layout: " + "; ".join(problems) + hint)
    return plan


def sd21_base_scheduler() -> DDPMScheduler:
    ddpm = DDPMScheduler(**SD21_BASE_SCHEDULER)
    ddpm.register_to_config(**SD21_BASE_SCHEDULER_EXTRAS)
    return ddpm


def convert_paint(
    checkpoint: str | os.PathLike,
    vocab: str | os.PathLike,
    vae: str | os.PathLike,
    output: str | os.PathLike,
    llm_config: dict | None = None,
    unet_config: dict | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "1GB",
    overwrite: bool = False,
    check: bool = False,
    repo_id: str | None = None,
) -> Path:
    """Writes a complete `VisCPMPaintPipeline` folder; returns its path.

    `dtype` casts the text encoder, UNet and VAE (default: keep each file's: float16 LLM, float32 UNet and VAE);
    the transblock stays float32, as the original keeps it. `llm_config` (original keys) and `unet_config` (a
    diffusers UNet config) are needed only for what the shapes do not tell. `check` refuses, listing them, tensors
    holding NaN or infinite values.
    `repo_id` is the Hub id the model card's usage snippet loads (default: the output folder's name).
    """
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"Checkpoint not found: {str(checkpoint)!r}.")
    if not Path(vocab).is_file():
        raise FileNotFoundError(f"Vocabulary not found: {str(vocab)!r} (the original vocabs/bee.txt).")
    vae_folder, vae_weights = find_vae(vae)
    refuse_output_over_inputs(output, [checkpoint, vocab, vae, vae_folder])
    prepare_output(output, overwrite)
    original = OriginalCheckpoint(checkpoint)
    shapes, source = original.shapes(), repr(str(checkpoint))
    llm_sizes = merge_sizes(read_cpmbee_sizes(shapes), llm_config, CPMBEE_10B, "--llm-config", source)
    text_config = text_encoder_config(llm_sizes)
    unet = build_unet(unet_config_from_checkpoint(shapes, unet_config, source))
    vae_source = OriginalCheckpoint(vae_weights)
    vae_model = build_vae(vae_folder, unet, {convert_vae_key(k)[1]: v for k, v in vae_source.shapes().items()})
    with torch.device("meta"):
        text_encoder = CpmBeeModel(text_config)
        transblock = VisCPMTransBlock(
            text_config.hidden_size, unet.config.cross_attention_dim, layer_norm_eps=TRANSBLOCK_LAYER_NORM_EPS
        )
    hint = (
        ". Check that it is a VisCPM-Paint checkpoint (llm.*, unet.*, trans_block.*) and that --llm-config / "
        "--unet-config describe it."
    )
    if any(key.startswith("vpm.") for key in original.keys()):
        hint += " It holds a vision tower (vpm.*): a VisCPM-Chat checkpoint converts with `viscpm-convert chat`."
    plan = plan_conversion(original, {"text_encoder": text_encoder, "transblock": transblock, "unet": unet}, hint=hint)
    vae_plan = plan_conversion(
        vae_source,
        {"vae": vae_model},
        convert_vae_key,
        hint=f" for the AutoencoderKL of its config.json. {SD21_VAE_HINT}",
    )
    check_floating(original, [key for pairs in plan.values() for key, _ in pairs])
    check_floating(vae_source, [key for key, _ in vae_plan["vae"]])
    # The caption format builds the original's prompts, cut to the text encoder's limit.
    tokenizer = CpmBeeTokenizer(vocab_file=str(vocab), prompt_format="caption", model_max_length=MAX_CAPTION_TOKENS)
    check_vocabulary(tokenizer, vocab, text_config.vocab_size, checkpoint)
    max_shard_bytes = parse_size(max_shard_size)
    sources = {"text_encoder": original, "transblock": original, "unet": original, "vae": vae_source}
    finite = FiniteCheck() if check else None

    with atomic_output_folder(output, overwrite=overwrite) as folder:
        written = {}
        for component, pairs in {**plan, **vae_plan}.items():
            source = sources[component]
            cast = torch.float32 if component == "transblock" else dtype
            entries = [(new_key, source.shape(key), cast or source.dtype(key)) for key, new_key in pairs]
            (folder / component).mkdir()

            def read(i, pairs=pairs, entries=entries, source=source, component=component):
                pieces = source.chunks(pairs[i][0], entries[i][2])
                name = pairs[i][0] if component != "vae" else f"{vae_weights.name}: {pairs[i][0]}"
                return finite.watch(name, pieces) if finite else pieces

            write_safetensors_shards(folder / component, entries, read, max_shard_bytes, prefix=WEIGHTS_PREFIX[component])
            written[component] = entries
        if finite:
            finite.raise_if_any(checkpoint, dtype)
        text_config.dtype = written["text_encoder"][0][2]
        text_config.save_pretrained(folder / "text_encoder")
        for component, model in (("transblock", transblock), ("unet", unet), ("vae", vae_model)):
            model.save_config(folder / component)
        sd21_base_scheduler().save_pretrained(folder / "scheduler")
        tokenizer.save_pretrained(folder / "tokenizer")
        model_index = {"_class_name": MODEL_INDEX["_class_name"], "_diffusers_version": diffusers.__version__}
        model_index.update({k: v for k, v in MODEL_INDEX.items() if k != "_class_name"})
        (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
        write_model_card(
            folder / "README.md",
            "paint",
            checkpoint=Path(checkpoint).name,
            config=text_config,
            repo_id=repo_id or Path(output).name,
        )
        (folder / "conversion.json").write_text(
            json.dumps(
                {
                    "source": Path(checkpoint).name,
                    "vae_source": f"{vae_weights.parent.name}/{vae_weights.name}",
                    "tensors": {component: len(entries) for component, entries in written.items()},
                },
                indent=2,
            )
            + "\n"
        )
    return Path(output)
