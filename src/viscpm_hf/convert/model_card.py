"""Model cards of converted folders, and of the four releases in `model_cards/` (the prose is in `templates/`)."""

import os
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData
from transformers import PreTrainedConfig

from ..hub import write_card


# The released weights' licence, as the original README names it (its repository has no LICENSE file).
LICENSE = {
    "license": "other",
    "license_name": "general-model-license",
    "license_link": "https://github.com/OpenBMB/General-Model-License/blob/main/"
    "%E9%80%9A%E7%94%A8%E6%A8%A1%E5%9E%8B%E8%AE%B8%E5%8F%AF%E5%8D%8F%E8%AE%AE-%E6%9D%A5%E6%BA%90%E8%AF%B4%E6%98%8E-"
    "%E5%AE%A3%E4%BC%A0%E9%99%90%E5%88%B6-%E9%9D%9E%E5%95%86%E4%B8%9A%E5%8C%96.md",
}
# The original evaluated both models with English and Chinese inputs.
LANGUAGES = ["en", "zh"]
METADATA = {
    "chat": {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "base_model": "openbmb/VisCPM-Chat",
        "tags": ["viscpm", "mpm", "multilingual", "vision-language"],
    },
    "paint": {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "base_model": ["openbmb/VisCPM-Paint", "stabilityai/stable-diffusion-2-1-base"],  # the VAE is SD-2.1-base's
        "tags": ["viscpm", "mpm", "multilingual", "text-to-image"],
    },
}
TRAINING = {
    "chat": (
        "Converted from the original VisCPM release. Stage 1 aligned the BEiT-3 bridge to the frozen CPM-Bee "
        "with English image-caption pairs (the zhplus variant adds native and translated Chinese pairs); stage 2 "
        "tuned both on bilingual (English and translated Chinese) instructions."
    ),
    "paint": (
        "Converted from the original VisCPM release. CPM-Bee stayed frozen; the transblock and the UNet (initialised "
        "from Stable Diffusion 2.1-base) were trained on English image-text pairs (the zhplus variant adds native and "
        "translated Chinese pairs). The original training code was not released."
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
# What OpenBMB reported for the releases (the original README), per input language in the order of `metrics`.
BENCHMARKS = {
    "chat": {
        "task_type": "image-text-to-text",
        "dataset_type": "llava-bench",
        "dataset_name": "LLaVA test set (English; Chinese: translated), answers scored by GPT-4",
        "metrics": [
            ("gpt-4-score", name) for name in ("conversation", "detailed description", "complex reasoning", "average")
        ],
    },
    "paint": {
        "task_type": "text-to-image",
        "dataset_type": "mscoco",
        "dataset_name": "MS-COCO, 30,000 sampled images",
        "metrics": [("fid", "zero-shot FID")],
    },
}
REPORTED_BY = {"source_name": "OpenBMB/VisCPM README", "source_url": "https://github.com/OpenBMB/VisCPM"}
RELEASES = {
    "viscpm-chat-balance": ("chat", "viscpm_chat_balance_checkpoint.pt", {"en": [83.3, 68.9, 90.5, 81.1],
                                                                          "zh": [92.7, 76.1, 89.2, 86.3]}),
    "viscpm-chat-zhplus": ("chat", "viscpm_chat_zhplus_checkpoint.pt", {"en": [80.1, 65.7, 92.5, 79.6],
                                                                        "zh": [90.3, 81.4, 92.1, 88.2]}),
    "viscpm-paint-balance": ("paint", "viscpm_paint_balance_checkpoint.pt", {"en": [9.5], "zh": [10.9]}),
    "viscpm-paint-zhplus": ("paint", "viscpm_paint_zhplus_checkpoint.pt", {"en": [9.9], "zh": [9.6]}),
}  # fmt: skip


def reported_results(kind: str, reported: dict[str, list[float]]) -> tuple[list[EvalResult], str]:
    """The model-index entries of `reported` ({language: values}) and the same numbers as a markdown paragraph."""
    benchmark = BENCHMARKS[kind]
    results = [
        EvalResult(
            task_type=benchmark["task_type"], dataset_type=benchmark["dataset_type"],
            dataset_name=benchmark["dataset_name"], dataset_config=language, metric_type=metric, metric_name=name,
            metric_value=value, **REPORTED_BY,
        )
        for language, values in reported.items()
        for (metric, name), value in zip(benchmark["metrics"], values, strict=True)
    ]  # fmt: skip
    names = [name for _, name in benchmark["metrics"]]
    rows = "\n".join(f"| {language} | " + " | ".join(map(str, values)) + " |" for language, values in reported.items())
    table = f"| input language | {' | '.join(names)} |\n|---|{'---|' * len(names)}\n{rows}"
    source = f"Results reported by OpenBMB (the original README, {REPORTED_BY['source_url']}; not re-measured here)"
    text = f"\n\n{source}. {benchmark['dataset_name']}:\n\n"
    return results, text + table


def write_model_card(
    path: Path,
    kind: str,
    checkpoint: str,
    config: PreTrainedConfig,
    repo_id: str | None = None,
    reported: dict[str, list[float]] | None = None,
) -> None:
    """`kind` is "chat" (config: the chat config) or "paint" (config: the text encoder's CPM-Bee config).

    `repo_id` names the model in the usage snippet and the metadata; by default the folder holding `path`.
    `reported` adds a release's published results ({language: values in the order of `BENCHMARKS[kind]`}).
    """
    name = repo_id or path.parent.name
    eval_results, results_text = reported_results(kind, reported) if reported else ([], "")
    template = resources.files(__package__).joinpath("templates", f"viscpm_{kind}.md").read_text(encoding="utf-8")
    llm_config = getattr(config, "text_config", config)
    body = template.format(
        variant=checkpoint,
        repo_id=name,
        llm=f"CPM-Bee ({llm_config.num_hidden_layers} layers, width {llm_config.hidden_size})",
        training=TRAINING[kind],
        results=results_text,
        limitations=LIMITATIONS[kind],
    )
    measured = {"model_name": name.split("/")[-1], "eval_results": eval_results} if eval_results else {}
    write_card(path, ModelCardData(**METADATA[kind], **LICENSE, language=LANGUAGES, **measured), body)


def write_release_cards(folder: str | os.PathLike) -> list[Path]:
    """`<folder>/<release>/README.md` for the four releases: what `viscpm-convert` writes for each, with the released
    configs' sizes and OpenBMB's results. `model_cards/` is this output (a test keeps it so)."""
    from .chat import chat_config_from_original  # imported here: both converters import this module
    from .paint import text_encoder_config

    configs = {"chat": chat_config_from_original(), "paint": text_encoder_config()}
    paths = []
    for name, (kind, checkpoint, reported) in RELEASES.items():
        path = Path(folder, name, "README.md")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_model_card(path, kind, checkpoint, configs[kind], repo_id=name, reported=reported)
        paths.append(path)
    return paths
