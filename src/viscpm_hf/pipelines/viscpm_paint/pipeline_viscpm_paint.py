"""VisCPM-Paint: text-to-image with a multilingual LLM as the text encoder (MPM paper, section 3.3).

A Stable Diffusion UNet and VAE are conditioned, through cross-attention, on the hidden states of a frozen LLM
passed through the transblock. Trained on English pairs only, the model follows prompts in the LLM's other
languages too. The tokenizer builds the text encoder's inputs, prompt structure included.
"""

import contextlib
import inspect
import logging
import math
import numbers
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import USE_PEFT_BACKEND, BaseOutput, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel

from .pixel_autoencoder import PixelShuffleAutoencoder
from .transblock import VisCPMTransBlock


logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# A tokenizer without a declared limit reports transformers' huge sentinel as its model_max_length.
NO_TOKENIZER_LIMIT = 1_000_000

# A fast tokenizer changes its Rust backend's truncation settings inside a call, which fails ("Already borrowed")
# when two threads tokenize at once; tokenizing takes microseconds, so calls take turns.
_TOKENIZER_LOCK = threading.Lock()
# Schedulers that are denoising now (by id): a scheduler holds per-call state (timesteps, step index, history).
_SCHEDULERS_IN_USE: set[int] = set()
_SCHEDULERS_LOCK = threading.Lock()


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> import viscpm_hf  # registers VisCPMPaintPipeline with diffusers
        >>> from viscpm_hf import VisCPMPaintPipeline

        >>> pipe = VisCPMPaintPipeline.from_pretrained("path/or/repo/of/viscpm-paint", dtype=torch.float16)
        >>> image = pipe("一只可爱的猫", generator=torch.Generator().manual_seed(0)).images[0]

        >>> pipe.load_lora_weights("path/to/output_dir/pipeline")  # a UNet LoRA, e.g. from train_paint.py --lora_rank
        >>> image = pipe("一只可爱的猫", cross_attention_kwargs={"scale": 0.7}).images[0]
        ```
"""


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class VisCPMPaintPipelineOutput(BaseOutput):
    """Output of [`VisCPMPaintPipeline`].

    Attributes:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images, in the call's `output_type` (the denoised latents for `"latent"`).
        nsfw_content_detected (`list[bool]`, *optional*):
            Per image, whether the safety checker flagged it; None without a checker or with `output_type="latent"`.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None = None


class VisCPMPaintPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    r"""
    Text-to-image with an LLM as the text encoder: a Stable Diffusion UNet and VAE, conditioned through
    cross-attention on the frozen LLM's hidden states passed through the transblock.

    UNet LoRAs load as in Stable Diffusion (`load_lora_weights`, `fuse_lora`, `unload_lora_weights`, `set_adapters`;
    the scale per call is `cross_attention_kwargs={"scale": s}`).

    Threads: one call at a time per scheduler. The scheduler keeps the state of the call that is denoising
    (timesteps, step index), so a second call on the same pipeline while one runs raises a `RuntimeError` instead
    of corrupting both. For concurrent requests give each one a pipeline that shares the models (no extra memory)
    but has its own scheduler, as diffusers' server guide does:
    `VisCPMPaintPipeline.from_pipe(pipe, scheduler=pipe.scheduler.from_config(pipe.scheduler.config), dtype=...)`
    (`from_pipe` casts the shared models to `dtype`, float32 when omitted: pass the pipeline's own). A LoRA scale
    given through `cross_attention_kwargs` is set on the shared UNet's layers during each forward, so concurrent
    calls must agree on it (or fuse the LoRA).

    Args:
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Any tokenizer of `text_encoder`; `tokenizer(texts)` builds the encoder's inputs (the converted release's
            tokenizer builds the original's prompts around each text).
        text_encoder (`PreTrainedModel`, *optional*):
            Any transformers model whose output has `last_hidden_state`; it stays frozen. Without it (and the
            tokenizer) the pipeline denoises from `prompt_embeds` only, e.g. ones computed by another pipeline's
            `encode_prompt`; a folder saved without them loads without them.
        transblock ([`VisCPMTransBlock`]):
            Maps the LLM's hidden size to the UNet's cross-attention width; kept in float32.
        unet ([`UNet2DConditionModel`], *optional*):
            Denoises the latents, as in Stable Diffusion. Needed to generate images only: without the UNet and the VAE
            the pipeline still encodes prompts.
        vae ([`AutoencoderKL`] or [`PixelShuffleAutoencoder`], *optional*):
            Decodes the latents into images, as in Stable Diffusion; [`PixelShuffleAutoencoder`] for tiny images.
            Needed to generate images only.
        scheduler ([`SchedulerMixin`]):
            Combined with `unet` to denoise the latents: DDPM for the released weights; any diffusers scheduler works.
        reranker (`PreTrainedModel`, *optional*):
            A CLIP-style model (its output has `logits_per_image`) that `rerank=N` uses to keep the best of N
            candidates (Chinese-CLIP in the paper).
        reranker_processor (`ProcessorMixin`, *optional*):
            The reranker's processor, called with `text=` and `images=`.
        safety_checker (`StableDiffusionSafetyChecker`, *optional*):
            Stable Diffusion's safety checker; what it flags is reported in `nsfw_content_detected`.
        feature_extractor (`CLIPImageProcessor`, *optional*):
            The safety checker's image processor.
    """

    model_cpu_offload_seq = "text_encoder->transblock->unet->vae"
    _optional_components = [
        "tokenizer", "text_encoder", "unet", "vae", "reranker", "reranker_processor", "safety_checker",
        "feature_extractor",
    ]  # fmt: skip
    _exclude_from_cpu_offload = ["safety_checker", "reranker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer,
        text_encoder: PreTrainedModel | None,
        transblock: VisCPMTransBlock,
        unet: UNet2DConditionModel | None,
        vae: AutoencoderKL | PixelShuffleAutoencoder | None,
        scheduler: KarrasDiffusionSchedulers,
        reranker: PreTrainedModel | None = None,
        reranker_processor=None,
        safety_checker=None,
        feature_extractor=None,
    ):
        super().__init__()
        text_width = None if text_encoder is None else getattr(text_encoder.config, "hidden_size", None)
        if text_width is not None and text_width != transblock.config.in_features:
            raise ValueError(
                f"The text encoder's hidden size ({text_width}) does not match the transblock's in_features "
                f"({transblock.config.in_features}): build the transblock as VisCPMTransBlock(in_features={text_width}, "
                f"out_features={transblock.config.out_features})."
            )
        if unet is not None and transblock.config.out_features != unet.config.cross_attention_dim:
            raise ValueError(
                f"The transblock gives {transblock.config.out_features} features but the UNet's cross_attention_dim "
                f"is {unet.config.cross_attention_dim}: they must be equal."
            )
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            transblock=transblock,
            unet=unet,
            vae=vae,
            scheduler=scheduler,
            reranker=reranker,
            reranker_processor=reranker_processor,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
        )
        # Without a VAE (a pipeline that only encodes prompts) Stable Diffusion's factor stands in, as in diffusers.
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "VisCPMPaintPipeline":
        """Loads the pipeline from a local folder or a Hub repo.

        A repo is downloaded first, since diffusers cannot resolve the third-party components of a repo it has not
        downloaded (diffusers#6563). Components saved as null (e.g. a folder shipped without its text encoder) load as
        None, as in diffusers.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A pipeline folder (the one with `model_index.json`) or a Hub repo id of the form `owner/name`.
            kwargs (`dict[str, Any]`, *optional*):
                Passed to `DiffusionPipeline.from_pretrained` (e.g. `dtype`, or a component such as `text_encoder=...`);
                the download options among them (`cache_dir`, `revision`, `token`, `local_files_only`,
                `force_download`, `proxies`) apply to the download too.

        Returns:
            The loaded pipeline.

        Raises:
            NotADirectoryError: `pretrained_model_name_or_path` is a file.
            FileNotFoundError: a local path that does not exist, or a repo that can be neither downloaded nor found in
                the cache.
        """
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
        from huggingface_hub.utils import validate_repo_id

        name = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(name):
            if os.path.exists(name):
                raise NotADirectoryError(
                    f"{name} is a file: from_pretrained takes a pipeline folder (the one with model_index.json) or a "
                    "Hub repo id."
                )
            try:
                validate_repo_id(name)
                looks_local = name.startswith(("./", "../", "~")) or isinstance(pretrained_model_name_or_path, os.PathLike)
            except HFValidationError:
                looks_local = True
            if looks_local:
                raise FileNotFoundError(
                    f"The folder {name} does not exist: check the path (from_pretrained takes a saved pipeline folder, "
                    "or a Hub repo id of the form 'owner/name')."
                )
            download_keys = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
            try:
                name = snapshot_download(name, **{k: kwargs[k] for k in download_keys if k in kwargs})
            except (LocalEntryNotFoundError, RepositoryNotFoundError) as error:
                raise FileNotFoundError(
                    f"{name} is neither a local folder nor a Hub repo that could be downloaded or found in the cache "
                    f"({type(error).__name__}): check the path or the repo id."
                ) from error
        return super().from_pretrained(name, **kwargs)

    # 1. Prompts -> UNet conditioning

    @property
    def max_prompt_length(self) -> int | None:
        """The most tokens the text encoder reads: the smaller of the tokenizer's `model_max_length` and the encoder's
        `max_position_embeddings` (None when neither is set). Longer prompts are truncated, with a warning."""
        limits = [getattr(self.tokenizer, "model_max_length", None)]
        if self.text_encoder is not None:
            limits.append(getattr(self.text_encoder.config, "max_position_embeddings", None))
        limits = [limit for limit in limits if _is_integer(limit) and 0 < limit < NO_TOKENIZER_LIMIT]
        return min(limits) if limits else None

    def _require_text_encoder(self) -> None:
        if self.text_encoder is None or self.tokenizer is None:
            missing = " and ".join(name for name in ("text_encoder", "tokenizer") if getattr(self, name) is None)
            raise ValueError(
                f"This pipeline has no {missing}, so it cannot encode text: pass prompt_embeds (and "
                "negative_prompt_embeds when guidance_scale > 1) from a pipeline that has one, e.g. its "
                f"encode_prompt(...), or load this one with {', '.join(f'{m}=...' for m in missing.split(' and '))}."
            )

    def _require_denoiser(self) -> None:
        missing = [name for name in ("unet", "vae") if getattr(self, name) is None]
        if missing:
            given = ", ".join(f"{name}=..." for name in missing)
            raise ValueError(
                f"This pipeline has no {' and '.join(missing)}, so it cannot generate images (encode_prompt works "
                f"without): load it with {given}, or add them to a pipeline that shares its other models: "
                f"VisCPMPaintPipeline.from_pipe(pipe, {given})."
            )

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        lora_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Encodes prompts into the UNet's conditioning: the text encoder runs once over all prompts (and negative
        prompts), then the transblock.

        Args:
            prompt (`str` or `list[str]`):
                The prompt or prompts; longer than `max_prompt_length` tokens, they are truncated with a warning.
            device (`torch.device`, *optional*):
                Where the embeddings and masks go; defaults to the pipeline's execution device.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                How many times each prompt's embeddings are repeated.
            do_classifier_free_guidance (`bool`, *optional*, defaults to `True`):
                Whether to encode the negative prompts too (the unconditional branch).
            negative_prompt (`str` or `list[str]`, *optional*):
                One for all prompts or one per prompt; the empty prompt when omitted, as the original. Ignored without
                guidance.
            lora_scale (`float`, *optional*):
                Scales LoRA layers loaded into the text encoder, as in Stable Diffusion.

        Returns:
            `(prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask)`: embeds
                `(batch * num_images_per_prompt, length, cross_attention_dim)`, masks `(batch * num_images_per_prompt,
                length)`; the negative ones are None without guidance. The masks are those of `encode_text` through
                `VisCPMTransBlock.conditioning_mask`: they cover padded rows where the tokenizer says they condition
                (the released model's prompts, as the original).

        Raises:
            ValueError: the pipeline has no text encoder or tokenizer, or `negative_prompt` has another number of
                entries than `prompt`.
        """
        self._require_text_encoder()
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = self._negative_prompts(negative_prompt, len(prompts)) if do_classifier_free_guidance else None
        scaled = lora_scale is not None and USE_PEFT_BACKEND
        if scaled:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            hidden_states, mask = self.encode_text(prompts, negatives, device)
        finally:
            if scaled:
                unscale_lora_layers(self.text_encoder, lora_scale)
        hidden_states, mask = hidden_states.to(self.transblock.device), mask.to(self.transblock.device)
        with torch.no_grad():
            embeds = self.transblock(hidden_states, mask)
            mask = self.transblock.conditioning_mask(mask)
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        mask = mask.to(device).repeat_interleave(num_images_per_prompt, dim=0)
        count = len(prompts) * num_images_per_prompt
        if negatives is None:
            return embeds, None, mask, None
        return embeds[:count], embeds[count:], mask[:count], mask[count:]

    @torch.no_grad()
    def encode_text(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None = None,
        device: torch.device | None = None,
        max_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder's final hidden states of `prompts` then `negative_prompts`, and the mask of the positions
        that condition the UNet: what the transblock reads, and what training caches.

        The mask hides padding, unless the tokenizer's `conditioning_mask` says it conditions too (the released
        model's prompts: the original feeds the UNet the `<pad>` rows of each prompt and its negative, padded to the
        longer of the two); then it covers each text's pair.

        Args:
            prompts (`list[str]`):
                The texts to encode.
            negative_prompts (`list[str]`, *optional*):
                One per prompt, encoded in the same batch, after the prompts.
            device (`torch.device`, *optional*):
                Where the text encoder's inputs go; defaults to the pipeline's execution device.
            max_length (`int`, *optional*):
                Texts longer than this many tokens lose tokens from their end, with a warning; defaults to
                `max_prompt_length` (no limit when that is None).

        Returns:
            `(hidden_states, mask)`: `(texts, length, hidden)` and `(texts, length)`, on the text encoder's device, the
                texts being `prompts` then `negative_prompts`.

        Raises:
            ValueError: the pipeline has no text encoder or tokenizer, or the tokenizer gives no token for a text.
        """
        self._require_text_encoder()
        device = device or self._execution_device
        inputs = self._tokenize(prompts + (negative_prompts or []), max_length or self.max_prompt_length)
        attention_mask = inputs["attention_mask"]
        pair_span = attention_mask
        if negative_prompts is not None:
            pair = attention_mask[: len(prompts)] | attention_mask[len(prompts) :]
            pair_span = torch.cat([pair, pair])
        mask = attention_mask | (inputs.get("conditioning_mask", attention_mask) & pair_span)
        model_inputs = {name: inputs[name].to(device) for name in self.tokenizer.model_input_names if name in inputs}
        hidden_states = self.text_encoder(**model_inputs).last_hidden_state
        return hidden_states, mask.to(hidden_states.device)

    def _tokenize(self, texts: list[str], max_length: int | None) -> dict[str, torch.Tensor]:
        """The tokenizer's outputs for `texts`, cut to `max_length` with a warning that counts the dropped tokens."""
        with _TOKENIZER_LOCK:
            inputs = self.tokenizer(
                texts, padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt"
            )
            if max_length is not None:
                plain = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        mask = inputs["attention_mask"]
        empty = [text for text, row in zip(texts, mask) if not row.any()]
        if empty:
            raise ValueError(
                f"The tokenizer gives no token for {empty[0]!r} (the unconditional branch of classifier-free guidance "
                "encodes the empty prompt): use a tokenizer that adds a BOS/CLS token, or pass a negative_prompt."
            )
        if max_length is not None:
            specials = self.tokenizer.num_special_tokens_to_add()
            kept = mask.sum(-1).tolist()
            dropped = [len(ids) + specials - count for ids, count in zip(plain, kept)]
            removed = [self.tokenizer.decode(ids[len(ids) - n :]) if n > 0 else "" for ids, n in zip(plain, dropped)]
            self._warn_truncated(texts, dropped, max_length, removed)
        return inputs

    @staticmethod
    def _warn_truncated(texts: list[str], dropped: list[int], limit: int, removed: list[str]) -> None:
        for text, count, lost in zip(texts, dropped, removed):
            if count > 0:
                shown = repr(text) if len(text) <= 40 else f"{text[:40]!r}..."
                what = f": {lost[:80]!r}" if lost else ""
                logger.warning(
                    f"Prompt {shown} is longer than the {limit} tokens the text encoder reads: {count} tokens were "
                    f"dropped from its end{what}."
                )

    def set_caption_anchors(self, captions: list[str], temperature: float = 0.03, batch_size: int = 64) -> None:
        """Anchors the transblock on these captions and on the empty one: each prompt's sentence vector is then
        replaced by a mix of the anchors nearest to it (see [`VisCPMTransBlock`]). Saved with the pipeline; a prompt in
        another language then draws what its nearest training caption draws.

        Args:
            captions (`list[str]`):
                Non-empty captions, e.g. the English training captions; the empty caption is added here.
            temperature (`float`, *optional*, defaults to 0.03):
                Relative to the median squared distance between an anchor and its nearest neighbour: near 0, a prompt
                takes its nearest anchor (see `VisCPMTransBlock.set_anchors`).
            batch_size (`int`, *optional*, defaults to 64):
                Captions per text encoder pass.

        Raises:
            ValueError: `captions` is empty or holds an empty caption, or the transblock was not built with
                `sentence_token="only"`.
        """
        if not captions or not all(isinstance(c, str) and c for c in captions):
            raise ValueError(
                "captions must be a non-empty list of non-empty strings (the empty caption is added here)."
            )
        device = self._execution_device
        sentences = []
        for start in range(0, len(captions) + 1, batch_size):
            chunk = (list(captions) + [""])[start : start + batch_size]
            hidden_states, mask = self.encode_text(chunk, device=device)
            hidden_states, mask = hidden_states.to(self.transblock.device).float(), mask.to(self.transblock.device)
            sentences.append(self.transblock.sentence_vectors(hidden_states, mask))
        self.transblock.set_anchors(torch.cat(sentences), temperature)

    @staticmethod
    def _negative_prompts(negative_prompt, batch_size: int) -> list[str]:
        if negative_prompt is None:
            return [""] * batch_size
        negatives = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != batch_size:
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries but prompt has {batch_size}: give one negative prompt "
                "per prompt, or a single string for all."
            )
        return negatives

    # 2. Checks

    def check_inputs(
        self,
        prompt,
        height,
        width,
        num_inference_steps,
        timesteps,
        guidance_scale,
        negative_prompt,
        num_images_per_prompt,
        eta,
        generator,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        prompt_attention_mask,
        negative_prompt_attention_mask,
        rerank,
        output_type,
        cross_attention_kwargs,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        guidance_rescale=0.0,
    ) -> None:
        """Checks every argument of `__call__` before any work; each error names the argument and what it takes.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                A string or a non-empty list of strings; needs the text encoder and tokenizer. Exactly one of `prompt`
                and `prompt_embeds`.
            height (`int`):
                A positive multiple of `vae_scale_factor`.
            width (`int`):
                A positive multiple of `vae_scale_factor`.
            num_inference_steps (`int`):
                Positive, unless `timesteps` is given.
            timesteps (`list[int]`, *optional*):
                Non-empty; only for schedulers whose `set_timesteps` takes `timesteps`.
            guidance_scale (`float`):
                Finite and >= 0.
            negative_prompt (`str` or `list[str]`, *optional*):
                One for all prompts or one per prompt; with a text `prompt` and `guidance_scale > 1` only.
            num_images_per_prompt (`int`):
                Positive.
            eta (`float`):
                Finite and >= 0.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                A list holds one generator per image (prompts x `num_images_per_prompt` x `rerank`).
            latents (`torch.Tensor`, *optional*):
                Finite floating-point values of shape `(images, unet in_channels, height / vae_scale_factor,
                width / vae_scale_factor)`.
            prompt_embeds (`torch.Tensor`, *optional*):
                Finite, of shape `(batch, length, cross_attention_dim)`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                With `prompt_embeds` only, of the same batch size; required with it when `guidance_scale > 1`.
            prompt_attention_mask (`torch.Tensor`, *optional*):
                With `prompt_embeds` only, of shape `prompt_embeds.shape[:2]`.
            negative_prompt_attention_mask (`torch.Tensor`, *optional*):
                With `negative_prompt_embeds` only, of shape `negative_prompt_embeds.shape[:2]`.
            rerank (`int`, *optional*):
                Positive; needs the reranker, its processor and a text `prompt`.
            output_type (`str`):
                One of `"pil"`, `"np"`, `"pt"`, `"latent"`.
            cross_attention_kwargs (`dict`, *optional*):
                A dict whose `"scale"`, if given, is a finite number.
            callback_on_step_end (`Callable`, *optional*):
                Callable.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Names among `_callback_tensor_inputs`.
            guidance_rescale (`float`, *optional*, defaults to 0.0):
                In [0, 1].

        Raises:
            ValueError: naming the argument that is wrong and what it takes.
        """
        for name, value in (("height", height), ("width", width)):
            if not _is_integer(value) or value <= 0:
                raise ValueError(
                    f"{name} must be a positive integer (a multiple of {self.vae_scale_factor}), got {value!r}."
                )
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(
                f"height and width must be divisible by {self.vae_scale_factor} (the VAE's downscaling factor), got "
                f"{height} x {width}."
            )
        if timesteps is None:
            if not _is_integer(num_inference_steps) or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        else:
            if not isinstance(timesteps, (list, tuple)) or not timesteps or not all(_is_integer(t) for t in timesteps):
                raise ValueError(f"timesteps must be a non-empty list of integers, got {timesteps!r}.")
            if "timesteps" not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(f"{type(self.scheduler).__name__} takes no custom timesteps: pass num_inference_steps.")
        if not _is_finite_number(guidance_scale) or guidance_scale < 0:
            raise ValueError(
                f"guidance_scale must be a finite number >= 0 (values <= 1 turn classifier-free guidance off, 7.5 is "
                f"the default), got {guidance_scale!r}."
            )
        if not _is_finite_number(guidance_rescale) or not 0 <= guidance_rescale <= 1:
            raise ValueError(
                f"guidance_rescale mixes in the rescaled prediction: it must be in [0, 1], got {guidance_rescale!r}."
            )
        if not _is_integer(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}.")
        if not _is_finite_number(eta) or eta < 0:
            raise ValueError(f"eta (DDIM's noise weight) must be a finite number >= 0, got {eta!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")

        # Prompts and their embeddings.
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either prompt or prompt_embeds, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass a prompt (a string or a list of strings), or prompt_embeds.")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}.")
            if len(prompts) == 0:
                raise ValueError("The prompt list is empty: give at least one prompt.")
            self._require_text_encoder()
            if prompt_attention_mask is not None or negative_prompt_attention_mask is not None:
                raise ValueError("Attention masks go with prompt_embeds; a text prompt makes its own.")
            batch_size = len(prompts)
        if negative_prompt is not None:
            if prompt is None:
                raise ValueError("negative_prompt is text: pass negative_prompt_embeds together with prompt_embeds.")
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(negatives, (list, tuple)) or not all(isinstance(p, str) for p in negatives):
                raise ValueError(
                    f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}."
                )
            self._negative_prompts(negative_prompt, batch_size)
            if guidance_scale <= 1:
                raise ValueError(
                    f"negative_prompt has no effect with guidance_scale={guidance_scale}: classifier-free guidance "
                    "needs guidance_scale > 1 (7.5 by default)."
                )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either negative_prompt or negative_prompt_embeds, not both.")
        if prompt_embeds is not None:
            self._check_embeds("prompt_embeds", prompt_embeds, prompt_attention_mask)
            batch_size = prompt_embeds.shape[0]
            if negative_prompt_embeds is not None:
                self._check_embeds("negative_prompt_embeds", negative_prompt_embeds, negative_prompt_attention_mask)
                if negative_prompt_embeds.shape[0] != batch_size:
                    raise ValueError(
                        f"prompt_embeds has batch size {batch_size} but negative_prompt_embeds has "
                        f"{negative_prompt_embeds.shape[0]}: they must be equal."
                    )
            elif guidance_scale > 1:
                raise ValueError("With prompt_embeds and guidance_scale > 1, pass negative_prompt_embeds too.")
            elif negative_prompt_attention_mask is not None:
                raise ValueError("negative_prompt_attention_mask goes with negative_prompt_embeds: pass both or neither.")
        elif negative_prompt_embeds is not None:
            raise ValueError("negative_prompt_embeds go with prompt_embeds; with a text prompt pass negative_prompt.")

        # Generation settings.
        if rerank is not None:
            if not _is_integer(rerank) or rerank < 1:
                raise ValueError(f"rerank must be a positive number of candidates per image, got {rerank!r}.")
            if self.reranker is None or self.reranker_processor is None:
                raise ValueError(
                    "rerank needs a reranker: load the pipeline with reranker=<a CLIP-style model> and "
                    "reranker_processor=<its processor> (Chinese-CLIP in the paper)."
                )
            if prompt is None:
                raise ValueError("rerank scores images against the prompt text: pass prompt, not prompt_embeds.")
        images = batch_size * num_images_per_prompt * (rerank or 1)
        generators = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            seed = generator if _is_integer(generator) else 0
            raise ValueError(
                f"generator must be a torch.Generator or a list of them (one per image), got {generator!r}: for a "
                f"seed, pass generator=torch.Generator().manual_seed({seed})."
            )
        if isinstance(generator, list) and len(generator) != images:
            raise ValueError(
                f"Got {len(generator)} generators for {images} images (prompts x num_images_per_prompt x rerank): "
                "pass one generator per image, or a single one."
            )
        if latents is not None:
            factor = self.vae_scale_factor
            shape = (images, self.unet.config.in_channels, height // factor, width // factor)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
                found = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(
                    f"latents have shape {found}, expected {shape} (images, channels, height / {factor}, "
                    f"width / {factor})."
                )
            if not latents.is_floating_point():
                raise ValueError(f"latents must be a floating-point tensor (the initial noise), got {latents.dtype}.")
            if not torch.isfinite(latents).all():
                raise ValueError("latents contain NaN or infinite values: the images would too.")
        if cross_attention_kwargs is not None:
            if not isinstance(cross_attention_kwargs, dict):
                raise ValueError(f"cross_attention_kwargs must be a dict, got {type(cross_attention_kwargs).__name__}.")
            scale = cross_attention_kwargs.get("scale", 1.0)
            if not _is_finite_number(scale):
                raise ValueError(
                    f"cross_attention_kwargs['scale'] (the LoRA scale) must be a finite number, got {scale!r}."
                )
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}.")
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not in {self._callback_tensor_inputs}.")

    def _check_embeds(self, name: str, embeds, mask) -> None:
        width = self.unet.config.cross_attention_dim
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width:
            found = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(
                f"{name} must be a (batch, length, {width}) tensor (transblock outputs, the UNet's "
                f"cross_attention_dim {width}), got {found}."
            )
        if not torch.isfinite(embeds).all():
            raise ValueError(f"{name} contain NaN or infinite values.")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2])):
            found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"The attention mask of {name} must have shape {tuple(embeds.shape[:2])}, got {found}.")

    @contextlib.contextmanager
    def _own_scheduler(self):
        """Holds the scheduler for one call; a second call on it while this one runs is refused."""
        key = id(self.scheduler)
        with _SCHEDULERS_LOCK:
            if key in _SCHEDULERS_IN_USE:
                raise RuntimeError(
                    "This pipeline's scheduler is already denoising in another call (another thread?). A scheduler "
                    "holds the state of its call, so two calls at once would corrupt each other. Give each thread "
                    "its own pipeline that shares the models: VisCPMPaintPipeline.from_pipe(pipe, "
                    "scheduler=pipe.scheduler.from_config(pipe.scheduler.config), dtype=<the pipeline's dtype>), "
                    "or let the calls take turns (a lock)."
                )
            _SCHEDULERS_IN_USE.add(key)
        try:
            yield
        finally:
            with _SCHEDULERS_LOCK:
                _SCHEDULERS_IN_USE.discard(key)

    # 3. Latents and sampling

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        """The initial latents: drawn noise, or the given `latents`, scaled by the scheduler's `init_noise_sigma`.

        Args:
            batch_size (`int`):
                The number of latents (prompts x images per prompt x `rerank` candidates).
            num_channels_latents (`int`):
                The UNet's `in_channels`.
            height (`int`):
                The image height in pixels.
            width (`int`):
                The image width in pixels.
            dtype (`torch.dtype`):
                The dtype of the latents (that of the UNet conditioning).
            device (`torch.device`):
                Where the latents go.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Draws the noise; a list holds one generator per latent.
            latents (`torch.Tensor`, *optional*):
                Noise to start from instead of drawing it; moved to `device` and cast to `dtype`, as drawn noise would
                be.

        Returns:
            latents (`torch.Tensor`): `(batch_size, num_channels_latents, height / vae_scale_factor,
                width / vae_scale_factor)`.
        """
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:  # in the dtype drawn noise would have (float64 noise from numpy, e.g., meets a float32 UNet)
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def set_timesteps(self, num_inference_steps: int, device, timesteps: list[int] | None = None) -> torch.Tensor:
        if timesteps is None:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        else:
            self.scheduler.set_timesteps(timesteps=timesteps, device=device)
        return self.scheduler.timesteps

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict:
        parameters = set(inspect.signature(self.scheduler.step).parameters)
        return {k: v for k, v in {"eta": eta, "generator": generator}.items() if k in parameters}

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # 4. Images out

    def run_safety_checker(self, image: torch.Tensor, device, dtype) -> tuple[torch.Tensor, list[bool] | None]:
        if self.safety_checker is None:
            return image, None
        pil_images = self.image_processor.postprocess(image, output_type="pil")
        checker_input = self.feature_extractor(pil_images, return_tensors="pt").to(device)
        return self.safety_checker(images=image, clip_input=checker_input.pixel_values.to(dtype))

    def rerank_scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores each image against its prompt with the reranker, for `rerank`'s best-of-N.

        Args:
            images (`torch.Tensor`):
                Decoded images `(n, 3, h, w)`, in [-1, 1] as the VAE gives them.
            prompts (`list[str]`):
                One prompt per image.

        Returns:
            The `(n,)` float32 scores on the CPU: the reranker's `logits_per_image` of each image with its own prompt
                (higher: a better match).
        """
        pil_images = self.image_processor.postprocess(images, output_type="pil")
        inputs = self.reranker_processor(text=prompts, images=pil_images, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = self.reranker(**inputs.to(self.reranker.device)).logits_per_image
        return logits.diagonal().float().cpu()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        rerank: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> VisCPMPaintPipelineOutput | tuple:
        r"""
        Generates images from prompts in any language the text encoder knows.

        Every argument is checked before any work (`check_inputs`). One call at a time per scheduler: see the class
        docstring for concurrent requests.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt or prompts to guide image generation; if not given, pass `prompt_embeds`. Prompts longer
                than `max_prompt_length` tokens are truncated, with a warning.
            height (`int`, *optional*, defaults to `self.unet.config.sample_size * self.vae_scale_factor`):
                The height in pixels of the generated images; a multiple of `vae_scale_factor`.
            width (`int`, *optional*, defaults to `self.unet.config.sample_size * self.vae_scale_factor`):
                The width in pixels of the generated images; a multiple of `vae_scale_factor`.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The number of denoising steps; ignored when `timesteps` is given.
            timesteps (`list[int]`, *optional*):
                Custom timesteps, for schedulers whose `set_timesteps` takes them; they replace
                `num_inference_steps`. By default the scheduler spaces its own (DDPM, as the paper, for the released
                weights).
            guidance_scale (`float`, *optional*, defaults to 7.5):
                Classifier-free guidance scale, off at 1 or below; higher values follow the prompt more closely. The
                unconditional branch encodes `negative_prompt`, or the empty prompt, as the original.
            guidance_rescale (`float`, *optional*, defaults to 0.0):
                In [0, 1]: rescales the guided prediction towards the standard deviation of the conditional one
                ("Common Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4), which keeps strong
                guidance from over-saturating v-prediction models; 0 leaves guidance as is.
            negative_prompt (`str` or `list[str]`, *optional*):
                What the images should not show: one string for all prompts or one per prompt. Needs
                `guidance_scale > 1`; with `prompt_embeds`, pass `negative_prompt_embeds` instead.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                The number of images to generate per prompt.
            eta (`float`, *optional*, defaults to 0.0):
                The η of the DDIM paper; only schedulers whose `step` takes `eta` (DDIM) use it, others ignore it.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                A generator, or one per image (prompts x `num_images_per_prompt` x `rerank`), to make generation
                deterministic.
            latents (`torch.Tensor`, *optional*):
                Noise `(images, unet in_channels, height / vae_scale_factor, width / vae_scale_factor)` to start from
                instead of drawing it with `generator`; scaled by the scheduler's `init_noise_sigma`.
            prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed UNet conditioning `(batch, length, cross_attention_dim)` (transblock outputs, e.g. from
                `encode_prompt`), instead of `prompt`; the only input of a pipeline built without text encoder and
                tokenizer.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed conditioning of the unconditional branch, with `prompt_embeds` and of its batch size;
                required with it when `guidance_scale > 1`.
            prompt_attention_mask (`torch.Tensor`, *optional*):
                The mask `(batch, length)` of `prompt_embeds` (1: the position conditions the UNet), e.g. from
                `encode_prompt`; without it every position conditions. A text `prompt` makes its own.
            negative_prompt_attention_mask (`torch.Tensor`, *optional*):
                The mask of `negative_prompt_embeds`, likewise.
            rerank (`int`, *optional*):
                Generate this many candidates per image and keep the best by the reranker's image-text score (the
                paper's best-of-N); needs `reranker`, `reranker_processor` and a text `prompt`.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"`, or `"latent"` for the denoised latents, not decoded.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`VisCPMPaintPipelineOutput`] instead of a plain tuple.
            cross_attention_kwargs (`dict`, *optional*):
                Passed to the UNet's attention processors, as in Stable Diffusion; `"scale"` weighs loaded LoRA layers
                (0 turns them off), of the text encoder too.
            callback_on_step_end (`Callable`, [`PipelineCallback`] or [`MultiPipelineCallbacks`], *optional*):
                Called after every denoising step as `callback_on_step_end(pipe, step, timestep, callback_kwargs)`,
                `callback_kwargs` holding the tensors named by `callback_on_step_end_tensor_inputs`. It returns a dict
                of the tensors it replaces for the remaining steps (`latents`, `prompt_embeds`,
                `negative_prompt_embeds`, each keeping its shape), or None to replace none.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`):
                The tensors passed to `callback_on_step_end`, among `_callback_tensor_inputs`; a `PipelineCallback`
                brings its own `tensor_inputs`.

        Returns:
            [`VisCPMPaintPipelineOutput`] if `return_dict` is True, otherwise the tuple `(images,
                nsfw_content_detected)`: the images in `output_type`, and per image whether the safety checker flagged
                it (None without a checker).

        Raises:
            ValueError: an argument that `check_inputs` refuses, a pipeline without UNet or VAE, or a tensor that
                `callback_on_step_end` cannot replace (an unknown name, another shape).
            RuntimeError: the scheduler is denoising in another call.
            TypeError: `callback_on_step_end` returns something other than a dict or None.
        """
        self._require_denoiser()
        if height is None:
            height = self.unet.config.sample_size * self.vae_scale_factor
        if width is None:
            width = self.unet.config.sample_size * self.vae_scale_factor
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self.check_inputs(
            prompt, height, width, num_inference_steps, timesteps, guidance_scale, negative_prompt,
            num_images_per_prompt, eta, generator, latents, prompt_embeds, negative_prompt_embeds,
            prompt_attention_mask, negative_prompt_attention_mask, rerank, output_type, cross_attention_kwargs,
            callback_on_step_end, callback_on_step_end_tensor_inputs, guidance_rescale,
        )  # fmt: skip
        with self._own_scheduler():
            self._guidance_scale = guidance_scale
            self._cross_attention_kwargs = cross_attention_kwargs
            self._interrupt = False
            device = self._execution_device
            candidates = num_images_per_prompt * (rerank or 1)
            lora_scale = None if cross_attention_kwargs is None else cross_attention_kwargs.get("scale")

            # 1. The text encoder runs once per call.
            if prompt_embeds is None:
                prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask = (
                    self.encode_prompt(
                        prompt, device, candidates, self.do_classifier_free_guidance, negative_prompt, lora_scale
                    )
                )
            else:
                prompt_embeds = prompt_embeds.to(device).repeat_interleave(candidates, dim=0)
                if negative_prompt_embeds is not None:
                    negative_prompt_embeds = negative_prompt_embeds.to(device).repeat_interleave(candidates, dim=0)
                if prompt_attention_mask is not None:
                    prompt_attention_mask = prompt_attention_mask.to(device).repeat_interleave(candidates, dim=0)
                if negative_prompt_attention_mask is not None:
                    negative_prompt_attention_mask = negative_prompt_attention_mask.to(device).repeat_interleave(
                        candidates, dim=0
                    )
            encoder_hidden_states, encoder_attention_mask = self._unet_conditioning(
                prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask
            )

            # 2. Timesteps and initial latents.
            timesteps = self.set_timesteps(num_inference_steps, device, timesteps)
            batch_size = prompt_embeds.shape[0]
            latents = self.prepare_latents(
                batch_size, self.unet.config.in_channels, height, width, encoder_hidden_states.dtype, device,
                generator, latents,
            )  # fmt: skip
            extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

            # 3. Denoising: only per-step work in the loop.
            self._num_timesteps = len(timesteps)
            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                    model_input = self.scheduler.scale_model_input(model_input, t)
                    noise_pred = self.unet(
                        model_input,
                        t,
                        encoder_hidden_states=encoder_hidden_states,
                        encoder_attention_mask=encoder_attention_mask,
                        cross_attention_kwargs=self.cross_attention_kwargs,
                        return_dict=False,
                    )[0]
                    if self.do_classifier_free_guidance:
                        noise_uncond, noise_text = noise_pred.chunk(2)
                        noise_pred = noise_uncond + self.guidance_scale * (noise_text - noise_uncond)
                        if guidance_rescale > 0:
                            noise_pred = rescale_noise_cfg(noise_pred, noise_text, guidance_rescale=guidance_rescale)
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                    if callback_on_step_end is not None:
                        local_tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
                        callback_kwargs = {k: local_tensors[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        updates = self._callback_updates(callback_outputs, local_tensors)
                        latents = updates.pop("latents", latents)
                        if updates:  # new conditioning for the remaining steps, as in Stable Diffusion
                            prompt_embeds = updates.get("prompt_embeds", prompt_embeds)
                            negative_prompt_embeds = updates.get("negative_prompt_embeds", negative_prompt_embeds)
                            encoder_hidden_states, encoder_attention_mask = self._unet_conditioning(
                                prompt_embeds, negative_prompt_embeds, prompt_attention_mask,
                                negative_prompt_attention_mask,
                            )  # fmt: skip
                    progress_bar.update()

            # 4. Decode, check, rerank, post-process.
            has_nsfw_concept = None
            if output_type == "latent":
                image = latents
            else:
                image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
                image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
            if rerank is not None:
                image, has_nsfw_concept = self._keep_best(image, has_nsfw_concept, prompt, num_images_per_prompt, rerank)
            if output_type != "latent":
                do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not nsfw for nsfw in has_nsfw_concept]
                image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

            self.maybe_free_model_hooks()
        if not return_dict:
            return image, has_nsfw_concept
        return VisCPMPaintPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)

    def _unet_conditioning(self, embeds, negative_embeds, mask, negative_mask):
        """The UNet's `encoder_hidden_states` (in its dtype) and `encoder_attention_mask`."""
        if self.do_classifier_free_guidance:
            embeds, mask = self._guidance_conditioning(embeds, negative_embeds, mask, negative_mask)
        return embeds.to(self.unet.dtype), mask

    @staticmethod
    def _callback_updates(outputs, tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """The tensors a step-end callback replaces (those it returns as given replace nothing); a callback that only
        watches may return None."""
        if outputs is None:
            return {}
        if not isinstance(outputs, Mapping):
            raise TypeError(
                "callback_on_step_end must return a dict of the tensors it replaces ({} or None for none, or the "
                f"callback_kwargs it was given), got {type(outputs).__name__}."
            )
        for name, value in outputs.items():
            if name not in tensors:
                raise ValueError(
                    f"callback_on_step_end returned {name!r}, which it cannot replace: it can replace {list(tensors)}."
                )
            current = tensors[name]
            if current is None:
                raise ValueError(f"callback_on_step_end returned {name}, which this call does not have (no guidance).")
            if not isinstance(value, torch.Tensor) or value.shape != current.shape:
                found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"callback_on_step_end returned {name} of shape {found}; it must keep the shape "
                    f"{tuple(current.shape)} of the tensor it replaces."
                )
        return {name: value for name, value in outputs.items() if value is not tensors[name]}

    def _guidance_conditioning(self, embeds, negative_embeds, mask, negative_mask):
        """[unconditional; conditional] as one UNet batch, both padded to a common length."""
        length = max(embeds.shape[1], negative_embeds.shape[1])

        def pad(tensor, value_mask):
            extra = length - tensor.shape[1]
            if value_mask is None:
                value_mask = torch.ones(tensor.shape[:2], dtype=torch.long, device=tensor.device)
            if extra:
                tensor = torch.nn.functional.pad(tensor, (0, 0, 0, extra))
                value_mask = torch.nn.functional.pad(value_mask, (0, extra))
            return tensor, value_mask

        negative_embeds, negative_mask = pad(negative_embeds, negative_mask)
        embeds, mask = pad(embeds, mask)
        encoder_mask = torch.cat([negative_mask, mask])
        return torch.cat([negative_embeds, embeds]), (None if bool(encoder_mask.all()) else encoder_mask)

    def _keep_best(self, images, has_nsfw_concept, prompt, num_images_per_prompt: int, rerank: int):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = num_images_per_prompt * rerank
        texts = [p for p in prompts for _ in range(per_prompt)]
        decoded = images if images.shape[1] == 3 else self.vae.decode(images / self.vae.config.scaling_factor, return_dict=False)[0]
        scores = self.rerank_scores(decoded, texts).view(len(prompts), per_prompt)
        keep = scores.topk(num_images_per_prompt, dim=1).indices
        keep = (keep + torch.arange(len(prompts))[:, None] * per_prompt).flatten()
        images = images[keep.to(images.device)]
        if has_nsfw_concept is not None:
            has_nsfw_concept = [has_nsfw_concept[i] for i in keep.tolist()]
        return images, has_nsfw_concept


__all__ = ["VisCPMPaintPipeline", "VisCPMPaintPipelineOutput"]
