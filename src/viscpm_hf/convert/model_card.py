"""Model cards written next to converted weights (templates in `templates/`)."""

from importlib import resources
from pathlib import Path

from transformers import PreTrainedConfig


TRAINING = {
    "chat": (
        "Converted from the original VisCPM release. Stage 1 aligned the BEiT-3 bridge to the frozen CPM-Bee "
        "with English image-caption pairs; stage 2 tuned both on bilingual (English and translated Chinese) "
        "instructions."
    ),
    "paint": (
        "Converted from the original VisCPM release. CPM-Bee stayed frozen; the transblock and the UNet (initialised "
        "from Stable Diffusion 2.1-base) were trained on English image-text pairs (the zhplus variant adds translated "
        "Chinese pairs). The original training code was not released."
    ),
}
LIMITATIONS = {
    "chat": (
        "The released weights are under the original non-commercial General Model License. The model can "
        "describe images wrongly or invent details; it was trained mostly on English and Chinese."
    ),
    "paint": (
        "Images can be wrong, biased or unsafe; no safety checker is included by default (pass one to the pipeline "
        "as `safety_checker`). Prompts in languages other than English and Chinese are followed poorly."
    ),
}


def write_model_card(
    path: Path, kind: str, checkpoint: str, config: PreTrainedConfig, repo_id: str | None = None
) -> None:
    """`kind` is "chat" (config: the chat config) or "paint" (config: the text encoder's CPM-Bee config).

    `repo_id` names the model in the usage snippet; by default the folder holding `path`.
    """
    template = resources.files(__package__).joinpath("templates", f"viscpm_{kind}.md").read_text(encoding="utf-8")
    llm_config = getattr(config, "text_config", config)
    text = template.format(
        variant=checkpoint,
        repo_id=repo_id or path.parent.name,
        llm=f"CPM-Bee ({llm_config.num_hidden_layers} layers, width {llm_config.hidden_size})",
        training=TRAINING[kind],
        limitations=LIMITATIONS[kind],
    )
    path.write_text(text, encoding="utf-8")
