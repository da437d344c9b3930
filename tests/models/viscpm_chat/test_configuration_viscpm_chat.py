import pytest
from transformers import AutoConfig, CLIPVisionConfig, Qwen2Config

from viscpm_hf import VisCPMChatConfig


def test_defaults_follow_the_paper():
    config = VisCPMChatConfig()
    assert config.num_query_tokens == 64
    assert config.projector_hidden_act == "gelu"
    assert config.vision_config.image_size == 224
    assert config.vision_feature_dim == config.vision_config.hidden_size


def test_sub_configs_from_dicts_and_objects(chat_config):
    config = VisCPMChatConfig(
        vision_config=CLIPVisionConfig(hidden_size=48, num_attention_heads=6),
        text_config={"model_type": "qwen2", "hidden_size": 32},
    )
    assert isinstance(config.text_config, Qwen2Config)
    assert config.vision_feature_dim == 48
    assert config.bridge_num_attention_heads == 6


def test_round_trip_through_save_and_auto_config(chat_config, tmp_path):
    chat_config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is VisCPMChatConfig
    assert loaded.to_diff_dict() | {"_name_or_path": ""} == chat_config.to_diff_dict() | {"_name_or_path": ""}


def test_bridge_heads_must_divide_the_vision_width():
    with pytest.raises(ValueError, match="divisible"):
        VisCPMChatConfig(
            vision_config=CLIPVisionConfig(hidden_size=30, num_attention_heads=6), bridge_num_attention_heads=4
        )


def test_vision_width_must_be_known():
    with pytest.raises(ValueError, match="vision_feature_dim"):
        VisCPMChatConfig(vision_config={"model_type": "timm_wrapper", "architecture": "resnet18"})
    config = VisCPMChatConfig(
        vision_config={"model_type": "timm_wrapper", "architecture": "resnet18"},
        vision_feature_dim=512,
        bridge_num_attention_heads=8,
    )
    assert config.vision_feature_dim == 512


def test_query_count_must_be_positive():
    with pytest.raises(ValueError, match="num_query_tokens"):
        VisCPMChatConfig(num_query_tokens=0)
