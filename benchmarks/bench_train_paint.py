"""examples/train_paint.py's training step against a plain accelerate loop that trains the same parameters (the
transblock and the UNet's cross-attention) of the same UNet, in one run.

Prints optimizer steps per second of each, timed in alternation (target ratio train_paint / plain >= 0.95), then what
freezing buys: parameters holding a gradient at the optimizer step, optimizer state bytes, and the growth of the
process's peak RSS over its first training steps (a fresh process per variant) with the text encoder frozen (both
loops) and trained.

    python benchmarks/bench_train_paint.py [--size 64] [--batch 4] [--rounds 10] [--steps 3]
"""

import argparse
import copy
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from transformers import BertConfig, BertModel

from viscpm_hf import VisCPMPaintPipeline, VisCPMTransBlock, build_byte_level_tokenizer
from viscpm_hf.training.paint import CaptionEncoder, PaintDenoiser, mark_trainable


ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red apple on a wooden table", "a small blue house by the sea", "a green tree in a field at noon",
            "a black cat sleeping on a sofa", "a yellow sun over the mountains", "an orange car in the rain"]  # fmt: skip


def load_train_paint():
    spec = importlib.util.spec_from_file_location("train_paint", ROOT / "examples" / "train_paint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_pipeline(text_hidden: int = 512, cross_attention_dim: int = 256) -> VisCPMPaintPipeline:
    """A text encoder that outweighs the trained part, as the LLM does in VisCPM-Paint, and a three-level UNet."""
    torch.manual_seed(0)
    tokenizer = build_byte_level_tokenizer(add_bos_token=True)
    text_encoder = BertModel(
        BertConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, num_hidden_layers=6, num_attention_heads=8,
                   intermediate_size=4 * text_hidden, max_position_embeddings=128)  # fmt: skip
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, use_linear_projection=True,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
    ).eval()  # fmt: skip
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    transblock = VisCPMTransBlock(in_features=text_hidden, out_features=cross_attention_dim)
    return VisCPMPaintPipeline(tokenizer, text_encoder, transblock, unet, vae, scheduler)


def make_batch(size: int, batch: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.rand(batch, 3, size, size, generator=generator) * 2 - 1,
        "captions": [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)],
    }


class ScriptLoop:
    """train_paint's own pieces: PaintDenoiser prepared, frozen LLM and VAE only placed, `training_step`."""

    def __init__(self, train_paint, pipeline, accelerator: Accelerator):
        self.train_paint, self.accelerator = train_paint, accelerator
        self.pipeline = pipeline
        pipeline.text_encoder.requires_grad_(False)
        pipeline.vae.requires_grad_(False)
        denoiser = PaintDenoiser(pipeline.transblock, pipeline.unet)
        mark_trainable(denoiser, "attn2")
        optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=1e-4)
        schedule = get_scheduler("constant", optimizer)
        self.denoiser, self.optimizer, self.schedule = accelerator.prepare(denoiser, optimizer, schedule)
        self.encoder = CaptionEncoder(pipeline)
        self.empty_states = self.encoder([""])[0]
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.micro_step = 0

    def step(self, batch: dict) -> float:
        loss = self.train_paint.training_step(
            batch, self.train_paint.step_generator(0, self.micro_step, 0), accelerator=self.accelerator,
            denoiser=self.denoiser, vae=self.pipeline.vae, noise_scheduler=self.noise_scheduler,
            caption_encoder=self.encoder, empty_states=self.empty_states, optimizer=self.optimizer,
            lr_scheduler=self.schedule, caption_dropout=0.1, max_grad_norm=1.0,
        )  # fmt: skip
        self.micro_step += 1
        return loss.item()

    def modules(self) -> dict:
        return {"text_encoder": self.pipeline.text_encoder, "vae": self.pipeline.vae, "trained part": self.denoiser}


class PlainLoop:
    """The loop of diffusers' text_to_image example: captions tokenized beforehand (as its data loader does), the
    text encoder under no_grad (or trained, with `train_text_encoder`), transblock + UNet prepared separately."""

    def __init__(self, pipeline, accelerator: Accelerator, train_text_encoder: bool = False):
        self.accelerator, self.pipeline, self.train_text_encoder = accelerator, pipeline, train_text_encoder
        pipeline.vae.requires_grad_(False)
        pipeline.text_encoder.requires_grad_(train_text_encoder)
        pipeline.transblock.requires_grad_(True)
        for name, parameter in pipeline.unet.named_parameters():
            parameter.requires_grad_("attn2" in name)
        modules = [pipeline.unet, pipeline.transblock] + ([pipeline.text_encoder] if train_text_encoder else [])
        parameters = [p for m in modules for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=1e-4)
        schedule = get_scheduler("constant", optimizer)
        prepared = accelerator.prepare(*modules, optimizer, schedule)
        self.unet, self.transblock = prepared[0], prepared[1]
        self.text_encoder = prepared[2] if train_text_encoder else pipeline.text_encoder
        self.optimizer, self.schedule = prepared[-2], prepared[-1]
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.tokens = None

    def step(self, batch: dict) -> float:
        if self.tokens is None:
            self.tokens = self.pipeline.tokenizer(batch["captions"], padding=True, return_tensors="pt")
        with torch.no_grad():
            latents = self.pipeline.vae.encode(batch["pixel_values"]).latent_dist.sample()
            latents = latents * self.pipeline.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with self.accelerator.accumulate(self.unet):
            with torch.set_grad_enabled(self.train_text_encoder):
                hidden = self.text_encoder(**self.tokens).last_hidden_state
            conditioning = self.transblock(hidden)
            mask = self.tokens["attention_mask"]
            prediction = self.unet(noisy, timesteps, conditioning, encoder_attention_mask=mask).sample
            loss = F.mse_loss(prediction.float(), noise.float())
            self.accelerator.backward(loss)
            self.accelerator.clip_grad_norm_(self.optimizer.param_groups[0]["params"], 1.0)
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def modules(self) -> dict:
        return {"text_encoder": self.text_encoder, "vae": self.pipeline.vae, "trained part": self.unet}


def gradient_census(loop) -> dict:
    """At the optimizer step: parameters holding a gradient per module, and the bytes of all gradients."""
    seen = {}

    def hook(optimizer, args, kwargs):
        modules = loop.modules()
        if isinstance(loop, PlainLoop):
            modules["transblock"] = loop.transblock
        grads = [p.grad for m in modules.values() for p in m.parameters() if p.grad is not None]
        seen.update({name: sum(p.grad is not None for p in m.parameters()) for name, m in modules.items()})
        seen["grad_mb"] = sum(g.numel() * g.element_size() for g in grads) / 2**20

    loop.optimizer.optimizer.register_step_pre_hook(hook)
    return seen


def optimizer_state_bytes(optimizer) -> int:
    state = optimizer.optimizer.state if hasattr(optimizer, "optimizer") else optimizer.state
    return sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if torch.is_tensor(t))


def reset_peak_rss() -> int:
    """Resets the process's peak RSS where Linux allows it (so that earlier peaks, e.g. model building, do not count)
    and returns the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(variant: str, size: int, batch_size: int, steps: int = 3) -> dict:
    """In a fresh process: gradients at the optimizer step, optimizer state, activations saved for backward (unique
    storages that are not weights), and the growth of the peak RSS over the first steps."""
    pipeline = build_pipeline()
    accelerator = Accelerator()
    batch = make_batch(size, batch_size)
    if variant == "train_paint":
        loop = ScriptLoop(load_train_paint(), pipeline, accelerator)
    else:
        loop = PlainLoop(pipeline, accelerator, train_text_encoder=variant == "plain, text encoder trained")
    census = gradient_census(loop)
    weights = {p.untyped_storage().data_ptr() for m in (pipeline.text_encoder, pipeline.vae, pipeline.unet,
                                                        pipeline.transblock) for p in m.parameters()}  # fmt: skip
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    before = reset_peak_rss()
    for _ in range(steps):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loop.step(batch)
    peak = peak_rss()
    return {
        "variant": variant,
        "census": census,
        "optimizer_state_mb": optimizer_state_bytes(loop.optimizer) / 2**20,
        "saved_activations_mb": sum(saved.values()) / 2**20,
        "rss_growth_mb": (peak - before) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--rounds", type=int, default=10, help="alternating timing rounds")
    parser.add_argument("--steps", type=int, default=3, help="steps per loop and round")
    parser.add_argument("--memory_size", type=int, default=32, help="image size of the memory measurement")
    parser.add_argument("--memory_batch", type=int, default=2, help="batch of the memory measurement")
    parser.add_argument("--memory-variant", help=argparse.SUPPRESS)  # internal: one memory measurement
    args = parser.parse_args()
    if args.memory_variant:
        print(json.dumps(measure_memory(args.memory_variant, args.size, args.batch)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}px, batch {args.batch}")
    train_paint = load_train_paint()
    base = build_pipeline()
    accelerator = Accelerator()
    script = ScriptLoop(train_paint, copy.deepcopy(base), accelerator)
    plain = PlainLoop(copy.deepcopy(base), accelerator)
    trained = sum(p.numel() for p in script.denoiser.parameters() if p.requires_grad)
    print(f"trained parameters: {trained:,} of {sum(p.numel() for p in script.denoiser.parameters()):,} "
          f"(transblock + UNet attn2); frozen text encoder {base.text_encoder.num_parameters():,}")  # fmt: skip
    batch = make_batch(args.size, args.batch)
    for loop in (script, plain):  # warm-up
        loop.step(batch)
    rates = {"train_paint": [], "plain": []}
    for round_index in range(args.rounds):
        order = [("train_paint", script), ("plain", plain)]
        for name, loop in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for _ in range(args.steps):
                loop.step(batch)
            rates[name].append(args.steps / (time.perf_counter() - start))
    script_rate, plain_rate = statistics.median(rates["train_paint"]), statistics.median(rates["plain"])
    ratio = statistics.median(a / b for a, b in zip(rates["train_paint"], rates["plain"]))
    print(f"steps/s (medians of {args.rounds} alternating rounds of {args.steps} steps): train_paint {script_rate:.2f}   "
          f"plain accelerate loop {plain_rate:.2f}   ratio (median of per-round ratios) {ratio:.3f} (target >= 0.95)")

    encoder_mb = sum(p.numel() * p.element_size() for p in base.text_encoder.parameters()) / 2**20
    print(f"memory of a step, a fresh process each ({args.memory_size}px, batch {args.memory_batch}; text encoder weights "
          f"{encoder_mb:.1f} MB; saved acts: tensors kept for backward, weights excluded):")
    print(f"  {'':30s} {'params with grad (text encoder / vae / trained)':>48s} {'grads':>9s} {'optimizer':>10s} "
          f"{'saved acts':>11s} {'peak RSS +':>11s}")
    for variant in ("train_paint", "plain, text encoder frozen", "plain, text encoder trained"):
        command = [sys.executable, __file__, "--memory-variant", variant, "--size", str(args.memory_size),
                   "--batch", str(args.memory_batch)]  # fmt: skip
        result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        census = result["census"]
        counts = f"{census['text_encoder']} / {census['vae']} / {census['trained part'] + census.get('transblock', 0)}"
        print(f"  {variant:30s} {counts:>48s} {census['grad_mb']:6.1f} MB {result['optimizer_state_mb']:7.1f} MB "
              f"{result['saved_activations_mb']:8.1f} MB {result['rss_growth_mb']:8.1f} MB")

if __name__ == "__main__":
    main()
