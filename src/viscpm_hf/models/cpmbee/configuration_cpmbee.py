"""Configuration of CPM-Bee, the bilingual (Chinese/English) LLM that VisCPM uses as its pivot."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class CpmBeeConfig(PreTrainedConfig):
    r"""
    Defaults are CPM-Bee 10B, as VisCPM ships it.

    Args:
        vocab_size (`int`, defaults to 86583): Size of the vocabulary (without the per-input ext columns).
        hidden_size (`int`, defaults to 4096): Model width (`dim_model` in the original).
        num_hidden_layers (`int`, defaults to 48)
        num_attention_heads (`int`, defaults to 32)
        head_dim (`int`, defaults to 128): Width of one head (`dim_head`).
        intermediate_size (`int`, defaults to 10240): Width of the gated-GELU FFN (`dim_ff`).
        position_bias_num_buckets (`int`, defaults to 256): Same-segment relative-position buckets (both directions).
        position_bias_num_segment_buckets (`int`, defaults to 256): Rows for segment-relation biases.
        position_bias_max_distance (`int`, defaults to 2048): Distance at which the log buckets saturate.
        rms_norm_eps (`float`, defaults to 1e-6)
        residual_scale (`float`, defaults to 1.05): Every residual sum is divided by this.
        rope_theta (`float`, defaults to 10000.0): Base of the rotation applied to embeddings by their sub id.
        sub_position_scale (`int`, defaults to 16): A token with sub id s is rotated as position `s * 16`.
        max_position_embeddings (`int`, *optional*): CPM-Bee has relative positions only; set a limit to refuse
            longer inputs.
        unk_token_id, root_token_id, answer_token_id (`int`, defaults to 1, 8, 9): The vocabulary's `<unk>`, `<root>`
            and `<ans>`, which delimit structured prompts and drive the original's decoding; the converter writes the
            ids of the vocabulary it converts with.
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
