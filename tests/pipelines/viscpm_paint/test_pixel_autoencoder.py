import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from tiny_paint import tiny_pipeline, tiny_unet

from viscpm_hf import PixelShuffleAutoencoder, VisCPMPaintPipeline, VisCPMTransBlock


def test_folds_pixels_exactly_and_back():
    vae = PixelShuffleAutoencoder(factor=2)
    image = torch.rand(2, 3, 8, 8) * 2 - 1
    latents = vae.encode(image).latent_dist.sample(torch.Generator().manual_seed(0))
    assert latents.shape == (2, 12, 4, 4)
    assert torch.equal(latents[0, :4, 0, 0], image[0, 0, :2, :2].flatten())  # one 2x2 patch of the red channel
    assert torch.equal(vae.decode(latents).sample, image)
    assert vae.config.latent_channels == 12 and 2 ** (len(vae.config.block_out_channels) - 1) == 2


def test_bad_factor_and_contradicting_config_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        PixelShuffleAutoencoder(factor=3)
    with pytest.raises(ValueError, match="latent_channels=4 contradicts"):
        PixelShuffleAutoencoder(factor=2, latent_channels=4)


def test_pipeline_in_pixel_space_round_trips(tmp_path):
    base = tiny_pipeline()
    unet = tiny_unet()
    unet.register_to_config(in_channels=12, out_channels=12)
    unet = type(unet).from_config(unet.config)
    pipe = VisCPMPaintPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder,
        transblock=VisCPMTransBlock(in_features=32, out_features=32, sentence_token="prepend"), unet=unet,
        vae=PixelShuffleAutoencoder(factor=2), scheduler=DDIMScheduler(prediction_type="v_prediction"),
    )  # fmt: skip
    assert pipe.vae_scale_factor == 2
    kwargs = {"num_inference_steps": 2, "output_type": "np", "guidance_scale": 2.0}
    image = pipe(["大象", "an elephant"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert image.shape == (2, 32, 32, 3)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.vae, PixelShuffleAutoencoder) and loaded.transblock.config.sentence_token == "prepend"
    again = loaded(["大象", "an elephant"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (again == image).all()
