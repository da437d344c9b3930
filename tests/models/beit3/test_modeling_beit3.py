import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from parity import PARITY_DIR
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from viscpm_hf.models.beit3 import (
    VisCPMBeit3Config,
    VisCPMBeit3Model,
    beit3_config_from_original,
    convert_beit3_key,
    convert_beit3_state_dict,
)


ATOL = RTOL = 1e-5


def parity_file(name: str) -> Path:
    if not PARITY_DIR.is_dir():
        pytest.skip(f"golden vectors not found at {PARITY_DIR} (this checkout is outside the viscpm-hf project)")
    return PARITY_DIR / name


@pytest.fixture(scope="module")
def original_weights() -> dict:
    return load_file(parity_file("viscpm_chat_tiny.safetensors"))


@pytest.fixture(scope="module")
def vision_vectors() -> dict:
    return load_file(parity_file("vision.safetensors"))


@pytest.fixture(scope="module")
def tiny_config() -> VisCPMBeit3Config:
    original = json.loads(parity_file("configs.json").read_text(encoding="utf-8"))["beit3_tiny"]
    return beit3_config_from_original(original)


def load_tiny_model(config, weights, attn_implementation="sdpa") -> VisCPMBeit3Model:
    model = VisCPMBeit3Model(config)
    model.set_attn_implementation(attn_implementation)
    model.load_state_dict(convert_beit3_state_dict(weights), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def parity_model(tiny_config, original_weights) -> VisCPMBeit3Model:
    return load_tiny_model(tiny_config, original_weights, "eager")


def small_model(seed=0, **overrides) -> VisCPMBeit3Model:
    config = VisCPMBeit3Config(
        image_size=32, patch_size=8, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        num_hidden_layers=2, num_query_tokens=4, max_query_positions=16, **overrides,
    )  # fmt: skip
    torch.manual_seed(seed)
    return VisCPMBeit3Model(config).eval()


def mapping(original_weights, features):
    """The chat glue of the original: Linear -> exact GELU -> Linear (`mapping.0`, `mapping.2`)."""
    linear = torch.nn.functional.linear
    hidden = linear(features, original_weights["mapping.0.weight"], original_weights["mapping.0.bias"])
    hidden = torch.nn.functional.gelu(hidden)
    return linear(hidden, original_weights["mapping.2.weight"], original_weights["mapping.2.bias"])


def assert_mapped_close(actual, expected):
    """The random tiny mapping amplifies (values up to ~165): allow 1e-5 of the tensor's scale."""
    torch.testing.assert_close(actual, expected, atol=ATOL * expected.abs().max().item(), rtol=RTOL)


# --- parity with the original VisCPM --------------------------------------------------------------------------


@pytest.mark.parametrize("image", ["image0", "image1"])
def test_matches_the_original(parity_model, vision_vectors, original_weights, image):
    pixel_values = vision_vectors[f"{image}.pixel_values"]
    with torch.no_grad():
        patch_embeddings = parity_model.embeddings.embed_image(pixel_values)
        out = parity_model(pixel_values, output_hidden_states=True)
    expected = vision_vectors[f"{image}.patch_embeddings_with_cls"]
    torch.testing.assert_close(patch_embeddings, expected, atol=ATOL, rtol=RTOL)
    expected = vision_vectors[f"{image}.encoder_out_all_tokens"]
    torch.testing.assert_close(out.all_tokens_last_hidden_state, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.last_hidden_state, vision_vectors[f"{image}.query_outputs"], atol=ATOL, rtol=RTOL)
    assert_mapped_close(mapping(original_weights, out.last_hidden_state), vision_vectors[f"{image}.mapped"])
    # The mapping itself, on the original's query outputs, is exact.
    expected = vision_vectors[f"{image}.mapped"]
    torch.testing.assert_close(mapping(original_weights, vision_vectors[f"{image}.query_outputs"]), expected)
    assert out.last_hidden_state.shape == (1, 64, 48)
    assert out.pooler_output.shape == (1, 48)
    assert len(out.hidden_states) == 1 + parity_model.config.num_hidden_layers
    assert out.hidden_states[0].shape == (1, 197 + 64, 48)


def test_batch_matches_the_original_and_each_image_alone(parity_model, vision_vectors, original_weights):
    pixel_values = torch.cat([vision_vectors["image0.pixel_values"], vision_vectors["image1.pixel_values"]])
    with torch.no_grad():
        batched = parity_model(pixel_values).last_hidden_state
        alone = torch.cat([parity_model(pixel_values[i : i + 1]).last_hidden_state for i in range(2)])
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=1e-6)
    assert_mapped_close(mapping(original_weights, batched), vision_vectors["batch01.mapped"])


def test_sdpa_matches_eager(tiny_config, original_weights, parity_model, vision_vectors):
    sdpa_model = load_tiny_model(tiny_config, original_weights, "sdpa")
    pixel_values = vision_vectors["image1.pixel_values"]
    with torch.no_grad():
        eager = parity_model(pixel_values, output_hidden_states=True)
        sdpa = sdpa_model(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(
        sdpa.all_tokens_last_hidden_state, eager.all_tokens_last_hidden_state, atol=1e-5, rtol=1e-5
    )
    for sdpa_states, eager_states in zip(sdpa.hidden_states, eager.hidden_states):
        torch.testing.assert_close(sdpa_states, eager_states, atol=1e-5, rtol=1e-5)


# --- conversion of the real checkpoint's names --------------------------------------------------------------------


def test_every_real_vision_key_maps_to_a_parameter_of_the_same_shape():
    real = json.loads(parity_file("real_checkpoint_keys.json").read_text(encoding="utf-8"))["chat_checkpoint"]
    with torch.device("meta"):
        model = VisCPMBeit3Model(VisCPMBeit3Config())
    parameters = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}

    covered, dropped = set(), set()
    for key, (shape, _) in real.items():
        if not (key == "query" or key.startswith("vpm.")):
            continue
        new_key = convert_beit3_key(key)
        if new_key is None:
            dropped.add(key)
            continue
        assert new_key in parameters, f"{key} -> {new_key} is not a parameter"
        assert parameters[new_key] == tuple(shape), f"{key}: {shape} vs {new_key}: {parameters[new_key]}"
        assert new_key not in covered, f"two original keys map to {new_key}"
        covered.add(new_key)
    assert covered == set(parameters)
    assert dropped == {
        "vpm.mim_head.weight", "vpm.mim_head.bias", "vpm.beit3.text_embed.weight", "vpm.beit3.vision_embed.mask_token",
    }  # fmt: skip
    assert model.num_parameters() == sum(torch.Size(shape).numel() for shape in parameters.values())


def test_key_names():
    assert convert_beit3_key("query") == "embeddings.query_tokens"
    assert (
        convert_beit3_key("vpm.beit3.encoder.layers.3.self_attn.out_proj.A.bias")
        == "encoder.layers.3.attention.out_proj.image.bias"
    )
    assert convert_beit3_key("vpm.beit3.encoder.layers.0.ffn.B.fc2.weight") == "encoder.layers.0.ffn.query.fc2.weight"
    assert (
        convert_beit3_key("vpm.beit3.encoder.layers.0.final_layer_norm.B.weight")
        == "encoder.layers.0.layer_norm_before_ffn.query.weight"
    )
    assert convert_beit3_key("vpm.beit3.encoder.layer_norm.A.weight") == "final_layer_norm.image.weight"
    for key in ("mapping.0.weight", "llm.input_embedding.weight", "vpm.beit3.encoder.layers.0.unknown.A.weight"):
        with pytest.raises(KeyError, match="not a BEiT-3"):
            convert_beit3_key(key)


# --- transformers behaviour -----------------------------------------------------------------------------------------


def test_auto_classes_and_save_load_round_trip(tmp_path):
    model = small_model()
    pixel_values = torch.randn(2, 3, 32, 32)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), VisCPMBeit3Config)
    for attn_implementation in ("eager", "sdpa"):
        reloaded = AutoModel.from_pretrained(tmp_path, attn_implementation=attn_implementation).eval()
        assert type(reloaded) is VisCPMBeit3Model
        assert reloaded.config._attn_implementation == attn_implementation
        with torch.no_grad():
            torch.testing.assert_close(
                reloaded(pixel_values).last_hidden_state, model(pixel_values).last_hidden_state, atol=1e-6, rtol=1e-6
            )


def test_a_folder_missing_a_tensor_is_refused_with_its_name(tmp_path):
    from safetensors.torch import save_file

    small_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    missing = next(key for key in weights if key.endswith("query_tokens"))
    del weights[missing]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=rf"missing .*: {re.escape(missing)}\. .*strict=False"):
        AutoModel.from_pretrained(tmp_path)
    AutoModel.from_pretrained(tmp_path, strict=False)  # partial weights, on purpose


def test_initialisation_and_outputs():
    model = small_model()
    embeddings = model.embeddings
    for parameter in (embeddings.query_tokens, embeddings.cls_token, embeddings.position_embedding_query.weight):
        assert parameter.abs().max() <= 2 * model.config.initializer_range  # truncated at two standard deviations
        assert parameter.std() > 0
    out = model(torch.randn(1, 3, 32, 32), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 4, 32)
    with pytest.raises(ValueError, match="eager"):
        model(torch.randn(1, 3, 32, 32), output_attentions=True)
    model.set_attn_implementation("eager")
    attentions = model(torch.randn(1, 3, 32, 32), output_attentions=True).attentions
    assert len(attentions) == 2 and attentions[0].shape == (1, 4, 1 + 16 + 4, 1 + 16 + 4)


def test_smaller_images_use_fewer_positions():
    model = small_model()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 24), output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 4, 32)
    assert out.hidden_states[-1].shape == (1, 1 + 6 + 4, 32)


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.randn(3, 32, 32), "shape"),
        ([[0.0]], "shape"),
        (torch.randn(1, 1, 32, 32), "channels"),
        (torch.randn(1, 3, 30, 32), "multiples of patch_size"),
        (torch.randn(1, 3, 32, 48), "position table"),
    ],
)
def test_bad_pixel_values_raise(pixel_values, message):
    with pytest.raises(ValueError, match=message):
        small_model()(pixel_values)


def test_bad_configs_raise():
    # @strict wraps the validators' ValueErrors in its own error class
    with pytest.raises((ValueError, StrictDataclassError), match="num_attention_heads"):
        VisCPMBeit3Config(hidden_size=30, num_attention_heads=4)
    with pytest.raises((ValueError, StrictDataclassError), match="max_query_positions"):
        VisCPMBeit3Config(num_query_tokens=64, max_query_positions=32)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = small_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.encoder.layers)
        torch.manual_seed(1)
        model(torch.randn(2, 3, 32, 32)).last_hidden_state.square().sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_in_tower_bridge_of_the_chat_model(tokenizer):
    from viscpm_hf import VisCPMChatConfig, VisCPMChatForConditionalGeneration

    vision = small_model()
    config = VisCPMChatConfig(
        vision_config=vision.config.to_dict(),
        text_config=dict(
            model_type="qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        num_query_tokens=4,
        bridge_type="in_tower",
    )  # fmt: skip
    chat = VisCPMChatForConditionalGeneration(config).eval()
    assert type(chat.model.vision_tower) is VisCPMBeit3Model
    chat.model.vision_tower.load_state_dict(vision.state_dict())
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = chat.get_image_features(pixel_values).pooler_output
        expected = chat.model.bridge.mapping(vision(pixel_values).last_hidden_state)
    assert features.shape == (2, 4, 32)
    torch.testing.assert_close(features, expected)
