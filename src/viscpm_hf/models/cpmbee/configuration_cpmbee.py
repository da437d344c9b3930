"""Configuration of CPM-Bee, the bilingual (Chinese/English) LLM that VisCPM uses as its pivot."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class CpmBeeConfig(PreTrainedConfig):
    r"""
    Defaults are CPM-Bee 10B, as VisCPM ships it.

    Args:
        vocab_size (`int`, defaults to 86583):
            Size of the vocabulary (without the per-input ext columns).
        hidden_size (`int`, defaults to 4096):
            Model width (`dim_model` in the original).
        num_hidden_layers (`int`, defaults to 48):
            Number of decoder layers.
        num_attention_heads (`int`, defaults to 32):
            Attention heads per layer.
        head_dim (`int`, defaults to 128):
            Width of one head (`dim_head`).
        intermediate_size (`int`, defaults to 10240):
            Width of the gated-GELU FFN (`dim_ff`).
        position_bias_num_buckets (`int`, defaults to 256):
            Same-segment relative-position buckets (both directions).
        position_bias_num_segment_buckets (`int`, defaults to 256):
            Rows for segment-relation biases.
        position_bias_max_distance (`int`, defaults to 2048):
            Distance at which the log buckets saturate.
        rms_norm_eps (`float`, defaults to 1e-6):
            Epsilon of every RMSNorm.
        residual_scale (`float`, defaults to 1.05):
            Every residual sum is divided by this.
        rope_theta (`float`, defaults to 10000.0):
            Base of the rotation applied to embeddings by their sub id.
        sub_position_scale (`int`, defaults to 16):
            A token with sub id s is rotated as position `s * 16`.
        max_position_embeddings (`int`, *optional*):
            CPM-Bee has relative positions only; set a limit to refuse longer inputs.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the position-bias initialisation (Linear weights and the embedding are unit-scale).
        attention_dropout (`float`, defaults to 0.0):
            Dropout on the attention probabilities in training.
        use_cache (`bool`, defaults to `True`):
            Whether the model returns its key/value cache.
        pad_token_id (`int`, *optional*, defaults to 0):
            The vocabulary's `<pad>`.
        bos_token_id (`int`, *optional*, defaults to 6):
            The vocabulary's `<s>`, which opens every segment.
        unk_token_id (`int`, *optional*, defaults to 1):
            The vocabulary's `<unk>`: the base id of out-of-vocabulary strings.
        root_token_id (`int`, *optional*, defaults to 8):
            The vocabulary's `<root>`, which opens a structured prompt.
        answer_token_id (`int`, *optional*, defaults to 9):
            The vocabulary's `<ans>`, the key of the answer in a structured prompt. These three ids delimit structured
            prompts and drive the original's decoding; the converter writes the ids of the vocabulary it converts
            with.
        eos_token_id (`int` or `list[int]`, *optional*, defaults to 7):
            The vocabulary's `</s>`, which closes a segment (and the answer).
        tie_word_embeddings (`bool`, defaults to `True`):
            The output head shares the token embedding table.
    """

    model_type = "cpmbee"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 86583
    hidden_size: int = 4096
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 10240
    position_bias_num_buckets: int = 256
    position_bias_num_segment_buckets: int = 256
    position_bias_max_distance: int = 2048
    rms_norm_eps: float = 1e-6
    residual_scale: float = 1.05
    rope_theta: float = 10000.0
    sub_position_scale: int = 16
    max_position_embeddings: int | None = None
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 6
    unk_token_id: int | None = 1
    root_token_id: int | None = 8
    answer_token_id: int | None = 9
    eos_token_id: int | list[int] | None = 7
    tie_word_embeddings: bool = True


__all__ = ["CpmBeeConfig"]
