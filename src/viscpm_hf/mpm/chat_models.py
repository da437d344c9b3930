"""The MPM chat models of the OpenMoji experiments (`examples/mpm/chat_openmoji.py`): built over pivots that PyPI
packages ship, saved as small adapter folders (bridge + LoRA), and rebuilt from those packages when loaded, as the
web demo does with the shipped default."""

from pathlib import Path

from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from ..models.viscpm_chat import (
    VisCPMChatConfig,
    VisCPMChatForConditionalGeneration,
    VisCPMChatProcessor,
    paper_image_processor,
)
from .pivots import load_efficientnet_lite0, load_gemma3_270m, load_smollm2


LLMS = {"gemma": load_gemma3_270m, "smollm2": load_smollm2}
LLM_TYPES = {"gemma3_text": "gemma", "llama": "smollm2"}  # the LLM a saved config was built on
PRETRAINED_TOWERS = {"efficientnet": load_efficientnet_lite0}  # vision model_type -> loader; frozen in both stages


def build_processor(tokenizer, image_size: int, num_query_tokens: int) -> VisCPMChatProcessor:
    """The processor of an MPM chat model: the LLM's tokenizer with an `<image>` placeholder, and the paper's image
    preprocessing.

    Args:
        tokenizer: the LLM's tokenizer; `<image>` is added to it (and its eos becomes its pad token if it has none).
        image_size: the side images are resized to.
        num_query_tokens: image tokens per image (the bridge's query count).

    Returns:
        `VisCPMChatProcessor`.
    """
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return VisCPMChatProcessor(
        image_processor=paper_image_processor(image_size), tokenizer=tokenizer, num_image_tokens=num_query_tokens
    )


def load_chat(adapter: str | Path, base: str | Path | None = None):
    """A stage-2 model of the OpenMoji experiment, with its adapter (LoRA, tower, bridge) merged in.

    Args:
        adapter: the adapter folder (`chat_openmoji.py --export_default` writes one; `examples/mpm/default/chat`).
        base: the base model folder; None: built from the adapter folder's config.json over the LLM and vision
            tower that their PyPI packages ship (`viscpm_hf.mpm.pivots`, built once on first use).

    Returns:
        `(model, processor)`: a `VisCPMChatForConditionalGeneration` in eval mode and its `VisCPMChatProcessor`.
    """
    from peft import PeftModel

    if base is not None:
        model = AutoModelForImageTextToText.from_pretrained(base)
        processor = AutoProcessor.from_pretrained(base)
    else:
        config = VisCPMChatConfig.from_pretrained(adapter)
        llm, tokenizer = LLMS[LLM_TYPES[config.text_config.model_type]]()
        processor = build_processor(tokenizer, config.vision_config.image_size, config.num_query_tokens)
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the <image> row: its logit is suppressed
        model = VisCPMChatForConditionalGeneration(config)
        model.model.llm.load_state_dict(llm.state_dict())
        if config.vision_config.model_type in PRETRAINED_TOWERS:  # frozen, so not in the adapter
            model.model.vision_tower.load_state_dict(PRETRAINED_TOWERS[config.vision_config.model_type]().state_dict())
        model.generation_config = GenerationConfig.from_pretrained(adapter)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval(), processor


def save_merged(adapter: str | Path, output: str | Path) -> None:
    """Writes the model `load_chat(adapter)` rebuilds as an ordinary VisCPM-Chat folder (weights and processor), which
    the Auto classes, `pipeline()` and `viscpm-serve` load like any other.

    Args:
        adapter: the adapter folder, e.g. `examples/mpm/default/chat`.
        output: the folder to write.
    """
    model, processor = load_chat(adapter)
    model.save_pretrained(output)
    processor.save_pretrained(output)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m viscpm_hf.mpm.chat_models",
        description="Merge an MPM chat adapter folder into its packaged LLM and vision tower and save an ordinary "
        "VisCPM-Chat folder (the pivots are built on first use).",
    )
    parser.add_argument("adapter", help="the adapter folder, e.g. examples/mpm/default/chat")
    parser.add_argument("output", help="the VisCPM-Chat folder to write")
    args = parser.parse_args(argv)
    from .pivots import show_build_messages

    show_build_messages()
    save_merged(args.adapter, args.output)
    print(f"wrote {args.output}: serve it with `viscpm-serve {args.output}`")


if __name__ == "__main__":
    main()
