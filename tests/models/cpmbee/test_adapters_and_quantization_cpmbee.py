"""CPM-Bee under the tools that swap, wrap or merge its Linears: PEFT's LoRA and the quantizers transformers offers.

CPM-Bee's projections are plain `nn.Linear`s at unit scale; the 1/sqrt(fan_in) is applied by the calling module, so
a LoRA branch, a merged LoRA and a quantized Linear all sit inside the same scaling as the original weight.
"""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import make_cpmbee
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from viscpm_hf import VisCPMChatConfig, VisCPMChatForConditionalGeneration


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(model, **kwargs):
    torch.manual_seed(1)  # init_lora_weights=False: B is random too, so the adapter changes the output
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False, **kwargs)
    return get_peft_model(model, config).eval()


@torch.no_grad()
def test_lora_changes_the_model_and_merging_keeps_its_output(tmp_path):
    model = make_cpmbee()
    ids = torch.randint(0, 120, (2, 10))
    base = model(input_ids=ids).logits
    adapted = lora(model)
    unmerged = adapted(input_ids=ids).logits
    assert (unmerged - base).abs().max() > 0.1  # the adapter does something

    adapted.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_cpmbee(), tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, unmerged, atol=1e-5, rtol=1e-5)

    merged = adapted.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(merged(input_ids=ids).logits, unmerged, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_lora_merges_exactly_in_a_chat_model_with_a_cpmbee_llm():
    llm = make_cpmbee().config
    config = VisCPMChatConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, image_size=32, patch_size=8, vision_use_head=False,
        ),
        text_config=llm, image_token_id=2, num_query_tokens=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = VisCPMChatForConditionalGeneration(config).eval()
    inputs = {"input_ids": torch.tensor([[6, 2, 2, 2, 2, 7, 50, 9]]), "pixel_values": torch.randn(1, 3, 32, 32)}
    base = model(**inputs).logits
    adapted = lora(model, exclude_modules=r".*vision_tower.*")
    unmerged = adapted(**inputs).logits
    assert (unmerged - base).abs().max() > 0.1
    merged = adapted.merge_and_unload()
    torch.testing.assert_close(merged(**inputs).logits, unmerged, atol=1e-5, rtol=1e-5)


def scaled_llama():
    """A Llama whose Linears have CPM-Bee's output scale (std 1/sqrt(fan_in)), so quantization errors compare."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        initializer_range=64**-0.5,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def quantization_configs():
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import BitsAndBytesConfig, QuantoConfig, TorchAoConfig

    return {
        "bnb-int8": BitsAndBytesConfig(load_in_8bit=True),
        "bnb-nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        "quanto-int8": QuantoConfig(weights="int8"),
        "torchao-int8": TorchAoConfig(Int8WeightOnlyConfig()),
    }


# Relative logit error ||quantized - fp32|| / ||fp32|| allowed for each scheme (4-bit weights of a tiny random
# model are coarse); CPM-Bee must also stay within 1.5x of the Llama control's error (+0.01).
TOLERANCE = {"bnb-int8": 0.05, "bnb-nf4": 0.6, "quanto-int8": 0.05, "torchao-int8": 0.05}


def stored_as_integers(linear: torch.nn.Module) -> bool:
    """Whether a quantized Linear really keeps integer weights (the memory saving), whatever the library."""
    weight = linear.weight
    inner = next((getattr(weight, name) for name in ("_data", "qdata") if hasattr(weight, name)), weight)
    return inner.dtype in (torch.int8, torch.uint8)


@pytest.mark.parametrize("scheme", list(TOLERANCE))
@torch.no_grad()
def test_quantized_cpmbee_is_as_close_to_fp32_as_a_llama_control(tmp_path, scheme):
    pytest.importorskip({"bnb": "bitsandbytes", "quanto": "optimum.quanto", "torchao": "torchao"}[scheme.split("-")[0]])
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    errors = {}
    for name, model in (("cpmbee", make_cpmbee(hidden_size=64, intermediate_size=64)), ("llama", scaled_llama())):
        model.save_pretrained(tmp_path / name)
        reference = model(input_ids=ids).logits
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp_path / name, quantization_config=quantization_configs()[scheme], device_map="cpu"
        )
        logits = quantized(input_ids=ids).logits.float()
        errors[name] = ((logits - reference).norm() / reference.norm()).item()
        layers = quantized.model.layers
        projections = [getattr(getattr(layer, part), p) for layer in layers for part in ("self_attn", "mlp")
                       for p in PROJECTIONS if hasattr(getattr(layer, part), p)]  # fmt: skip
        assert len(projections) == 14 and all(stored_as_integers(linear) for linear in projections), name
        if scheme.startswith("bnb"):  # bitsandbytes' own parameters report their packed size
            assert quantized.get_memory_footprint() < 0.6 * model.get_memory_footprint()
    assert errors["cpmbee"] <= TOLERANCE[scheme], errors
    assert errors["cpmbee"] <= 1.5 * errors["llama"] + 0.01, errors
