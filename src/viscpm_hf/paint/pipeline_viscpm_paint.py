"""VisCPM-Paint: text-to-image with a multilingual LLM as the text encoder (MPM paper, section 3.3).

A Stable Diffusion UNet and VAE are conditioned, through cross-attention, on the hidden states of a frozen LLM
passed through the transblock. Trained on English pairs only, the model follows prompts in the LLM's other
languages too. With CPM-Bee (the released weights) prompts are built exactly as the original builds them.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel

from ..cpmbee.prompt_cpmbee import collate_prompts, flatten_prompt
from ..cpmbee.tokenization_cpmbee import CpmBeeTokenizer, escape_markup
from .pixel_autoencoder import PixelShuffleAutoencoder
from .transblock import VisCPMTransBlock


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> import viscpm_hf  # registers VisCPMPaintPipeline with diffusers
        >>> from viscpm_hf import VisCPMPaintPipeline

        >>> pipe = VisCPMPaintPipeline.from_pretrained("path/or/repo/of/viscpm-paint", dtype=torch.float16)
        >>> image = pipe("一只可爱的猫", generator=torch.Generator().manual_seed(0)).images[0]
        ```
"""


@dataclass
class VisCPMPaintPipelineOutput(BaseOutput):
    """`images`, and per image whether the safety checker flagged it (None without a checker)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None = None


class VisCPMPaintPipeline(DiffusionPipeline):
    r"""
    Text-to-image with an LLM as the text encoder.

    Args:
        tokenizer: A [`CpmBeeTokenizer`] (the released weights: prompts are built as the original builds them) or
            any tokenizer of `text_encoder`.
        text_encoder: Any transformers model whose output has `last_hidden_state`; it stays frozen.
        transblock ([`VisCPMTransBlock`]): LLM hidden size -> UNet cross-attention width.
        unet ([`UNet2DConditionModel`]), vae ([`AutoencoderKL`], or [`PixelShuffleAutoencoder`] for tiny images), scheduler: as in Stable Diffusion (DDPM for the
            released weights; any diffusers scheduler works).
        reranker, reranker_processor (*optional*): a CLIP-style model (`logits_per_image`) and its processor,
            used by `rerank=N` to keep the best of N candidates (Chinese-CLIP in the paper).
        safety_checker, feature_extractor (*optional*): Stable Diffusion's safety checker and its image processor.
    """

    model_cpu_offload_seq = "text_encoder->transblock->unet->vae"
    _optional_components = ["reranker", "reranker_processor", "safety_checker", "feature_extractor"]
    _exclude_from_cpu_offload = ["safety_checker", "reranker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer,
        text_encoder: PreTrainedModel,
        transblock: VisCPMTransBlock,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL | PixelShuffleAutoencoder,
        scheduler: KarrasDiffusionSchedulers,
        reranker: PreTrainedModel | None = None,
        reranker_processor=None,
        safety_checker=None,
        feature_extractor=None,
    ):
        super().__init__()
        text_width = getattr(text_encoder.config, "hidden_size", None)
        if text_width is not None and text_width != transblock.config.in_features:
            raise ValueError(
                f"The text encoder's hidden size ({text_width}) does not match the transblock's in_features "
                f"({transblock.config.in_features}): build the transblock as VisCPMTransBlock(in_features={text_width}, "
                f"out_features={transblock.config.out_features})."
            )
        if transblock.config.out_features != unet.config.cross_attention_dim:
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
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "VisCPMPaintPipeline":
        """Loads a local folder or a Hub repo; a repo is downloaded first, since diffusers cannot resolve the
        third-party components of a repo it has not downloaded (diffusers#6563)."""
        from pathlib import Path

        from huggingface_hub import snapshot_download

        if not Path(pretrained_model_name_or_path).is_dir():
            download_keys = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
            pretrained_model_name_or_path = snapshot_download(
                str(pretrained_model_name_or_path), **{k: kwargs[k] for k in download_keys if k in kwargs}
            )
        index = Path(pretrained_model_name_or_path) / "model_index.json"
        if index.is_file():
            import json

            entries = json.loads(index.read_text())
            absent = [name for name in ("tokenizer", "text_encoder") if entries.get(name, [None])[0] is None and name not in kwargs]
            if absent:
                raise ValueError(
                    f"{pretrained_model_name_or_path} was saved without its {' and '.join(absent)} (model_index.json "
                    f"lists them as null, e.g. to ship a small folder whose encoder comes from elsewhere): pass "
                    f"{', '.join(f'{name}=...' for name in absent)} to from_pretrained, e.g. from "
                    "viscpm_hf.pivots.load_multilingual_e5() for the MPM demo."
                )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # 1. Prompts -> UNet conditioning

    @property
    def faithful_prompts(self) -> bool:
        """With CPM-Bee, prompts take the original's structure and padding (the released weights expect them)."""
        return isinstance(self.tokenizer, CpmBeeTokenizer)

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Runs the text encoder once over all prompts (and negative prompts) and the transblock.

        Returns `(prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask)`,
        embeds `(batch * num_images_per_prompt, length, cross_attention_dim)`, masks `(batch * num_images, length)`.
        With CPM-Bee the masks keep the original's padding (each prompt and its negative are padded with `<pad>`
        to the longer of the two, and those rows are seen by the UNet); they only hide padding added to batch
        prompts of different lengths.
        """
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = self._negative_prompts(negative_prompt, len(prompts)) if do_classifier_free_guidance else None
        hidden_states, mask = self._text_states(prompts, negatives, device)
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
    def _text_states(
        self, prompts: list[str], negatives: list[str] | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder's final hidden states of prompts then negatives, with their mask, on the transblock's
        device."""
        if self.faithful_prompts:
            inputs, mask = self._cpmbee_inputs(prompts, negatives)
        else:
            inputs = self.tokenizer(prompts + (negatives or []), padding=True, return_tensors="pt")
            mask = inputs["attention_mask"]
            if not mask.any(-1).all():
                raise ValueError(
                    "The tokenizer gives no token for an empty prompt (the unconditional branch encodes the empty "
                    "negative prompt): use a tokenizer that adds a BOS/CLS token, or pass a negative_prompt."
                )
            inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden_states = self.text_encoder(**{k: v.to(device) for k, v in inputs.items()}).last_hidden_state
        return hidden_states.to(self.transblock.device), mask.to(self.transblock.device)

    def set_caption_anchors(self, captions: list[str], temperature: float = 0.03, batch_size: int = 64) -> None:
        """Anchors the transblock on these captions (e.g. the English training captions) and on the empty one: each
        prompt's sentence vector is replaced by a mix of the anchors nearest to it (see `VisCPMTransBlock`). Saved
        with the pipeline; a prompt in another language then draws what its nearest training caption draws."""
        if not captions or not all(isinstance(c, str) and c for c in captions):
            raise ValueError(
                "captions must be a non-empty list of non-empty strings (the empty caption is added here)."
            )
        device = self._execution_device
        sentences = []
        for start in range(0, len(captions) + 1, batch_size):
            chunk = (list(captions) + [""])[start : start + batch_size]
            hidden_states, mask = self._text_states(chunk, None, device)
            sentences.append(self.transblock.sentence_vectors(hidden_states.float(), mask))
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

    def _cpmbee_inputs(self, prompts: list[str], negatives: list[str] | None) -> tuple[dict, torch.Tensor]:
        """The original's CPM-Bee inputs `{'caption': prompt, 'objects': ''}`, padded to the batch's longest."""
        texts = prompts + (negatives or [])
        flattened = [flatten_prompt(self.tokenizer, {"caption": escape_markup(t), "objects": ""}) for t in texts]
        lengths = [len(p) for p in flattened]
        batch = collate_prompts(self.tokenizer, flattened, max(lengths))
        inputs = batch.model_inputs()
        inputs.pop("ext_table_ids"), inputs.pop("ext_table_sub")  # a text encoder scores nothing
        # Each prompt and its negative share a length: the longer of the two, padding included, as the original.
        pair_lengths = torch.tensor(lengths[: len(prompts)])
        if negatives is not None:
            pair_lengths = torch.maximum(pair_lengths, torch.tensor(lengths[len(prompts) :]))
            pair_lengths = torch.cat([pair_lengths, pair_lengths])
        mask = (torch.arange(max(lengths))[None] < pair_lengths[:, None]).long()
        return inputs, mask

    # 2. Checks

    def check_inputs(
        self,
        prompt,
        height: int,
        width: int,
        guidance_scale: float,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        callback_on_step_end_tensor_inputs,
        rerank: int | None,
        guidance_rescale: float = 0.0,
    ) -> None:
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(
                f"height and width must be divisible by {self.vae_scale_factor} (the VAE's downscaling factor), got "
                f"{height} x {width}."
            )
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
        if negative_prompt is not None and guidance_scale <= 1:
            raise ValueError(
                f"negative_prompt has no effect with guidance_scale={guidance_scale}: classifier-free guidance needs "
                "guidance_scale > 1 (7.5 by default)."
            )
        if not 0 <= guidance_rescale <= 1:
            raise ValueError(
                f"guidance_rescale mixes in the rescaled prediction: it must be in [0, 1], got {guidance_rescale}."
            )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either negative_prompt or negative_prompt_embeds, not both.")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape[0] != negative_prompt_embeds.shape[0]:
                raise ValueError(
                    f"prompt_embeds has batch size {prompt_embeds.shape[0]} but negative_prompt_embeds has "
                    f"{negative_prompt_embeds.shape[0]}: they must be equal."
                )
        if prompt_embeds is not None and guidance_scale > 1 and negative_prompt_embeds is None:
            raise ValueError("With prompt_embeds and guidance_scale > 1, pass negative_prompt_embeds too.")
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not in {self._callback_tensor_inputs}.")
        if rerank is not None:
            if rerank < 1:
                raise ValueError(f"rerank must be a positive number of candidates per image, got {rerank}.")
            if self.reranker is None or self.reranker_processor is None:
                raise ValueError(
                    "rerank needs a reranker: load the pipeline with reranker=<a CLIP-style model> and "
                    "reranker_processor=<its processor> (Chinese-CLIP in the paper)."
                )
            if prompt is None:
                raise ValueError("rerank scores images against the prompt text: pass prompt, not prompt_embeds.")

    # 3. Latents and sampling

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} images.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}.")
        else:
            latents = latents.to(device)
        return latents * self.scheduler.init_noise_sigma

    def set_timesteps(self, num_inference_steps: int, device, timesteps: list[int] | None = None) -> torch.Tensor:
        if timesteps is None:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        elif "timesteps" in inspect.signature(self.scheduler.set_timesteps).parameters:
            self.scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            raise ValueError(f"{type(self.scheduler).__name__} takes no custom timesteps: pass num_inference_steps.")
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
        """Image-text score of each image `(n, 3, h, w)` in [0, 1] against its prompt, from the reranker."""
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
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> VisCPMPaintPipelineOutput | tuple:
        r"""
        Generates images from prompts in any language the text encoder knows.

        Args:
            prompt: The prompt(s). height, width: default the UNet's sample size times the VAE factor.
            num_inference_steps (defaults to 50), timesteps: the schedule (DDPM as the paper by default).
            guidance_scale (defaults to 7.5): classifier-free guidance; the unconditional branch encodes
                `negative_prompt`, or the empty prompt, as the original.
            guidance_rescale (defaults to 0.0): rescales the guided prediction towards the standard deviation of the
                conditional one ("Common Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4), which
                keeps strong guidance from over-saturating v-prediction models; 0 leaves guidance as is.
            num_images_per_prompt, eta, generator, latents: as in Stable Diffusion.
            prompt_embeds, negative_prompt_embeds: precomputed UNet conditioning (transblock outputs), with their
                optional `prompt_attention_mask` / `negative_prompt_attention_mask`.
            rerank (`int`, *optional*): generate this many candidates per image and keep the best by the reranker's
                image-text score (the paper's best-of-N).
            output_type: "pil", "np", "pt" or "latent". return_dict: a `VisCPMPaintPipelineOutput` or a tuple.
            callback_on_step_end, callback_on_step_end_tensor_inputs: called after every step with the tensors
                named; returning `{"latents": ...}` replaces them.
        """
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self.check_inputs(
            prompt, height, width, guidance_scale, negative_prompt, prompt_embeds, negative_prompt_embeds,
            callback_on_step_end_tensor_inputs, rerank, guidance_rescale,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        candidates = num_images_per_prompt * (rerank or 1)

        # 1. The text encoder runs once per call.
        if prompt_embeds is None:
            prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask = (
                self.encode_prompt(prompt, device, candidates, self.do_classifier_free_guidance, negative_prompt)
            )
        else:
            prompt_embeds = prompt_embeds.repeat_interleave(candidates, dim=0)
            if negative_prompt_embeds is not None:
                negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(candidates, dim=0)
            if prompt_attention_mask is not None:
                prompt_attention_mask = prompt_attention_mask.repeat_interleave(candidates, dim=0)
            if negative_prompt_attention_mask is not None:
                negative_prompt_attention_mask = negative_prompt_attention_mask.repeat_interleave(candidates, dim=0)
        encoder_hidden_states, encoder_attention_mask = prompt_embeds, prompt_attention_mask
        if self.do_classifier_free_guidance:
            encoder_hidden_states, encoder_attention_mask = self._guidance_conditioning(
                prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask
            )
        encoder_hidden_states = encoder_hidden_states.to(self.unet.dtype)

        # 2. Timesteps and initial latents.
        timesteps = self.set_timesteps(num_inference_steps, device, timesteps)
        batch_size = prompt_embeds.shape[0]
        latents = self.prepare_latents(
            batch_size, self.unet.config.in_channels, height, width, encoder_hidden_states.dtype, device, generator, latents
        )
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
                    latents = callback_outputs.pop("latents", latents)
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
