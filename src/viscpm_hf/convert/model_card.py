"""Model cards written next to converted weights (templates in `templates/`)."""

from importlib import resources
from pathlib import Path

from transformers import PreTrainedConfig


def write_model_card(path: Path, kind: str, checkpoint: str, config: PreTrainedConfig) -> None:
    template = resources.files(__package__).joinpath("templates", f"viscpm_{kind}.md").read_text(encoding="utf-8")
    text = template.format(
        variant=checkpoint,
        repo_id=path.parent.name,
        llm=f"CPM-Bee ({config.text_config.num_hidden_layers} layers, width {config.text_config.hidden_size})",
        training=(
            "Converted from the original VisCPM release. Stage 1 aligned the BEiT-3 bridge to the frozen CPM-Bee "
            "with English image-caption pairs; stage 2 tuned both on bilingual (English and translated Chinese) "
            "instructions."
        ),
        limitations=(
            "The released weights are under the original non-commercial General Model License. The model can "
            "describe images wrongly or invent details; it was trained mostly on English and Chinese."
        ),
    )
    path.write_text(text, encoding="utf-8")
