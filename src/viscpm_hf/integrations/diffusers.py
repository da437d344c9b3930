"""`DiffusionPipeline.from_pretrained` finds VisCPMPaintPipeline and loads its components.

diffusers resolves a pipeline's `_class_name` in its own namespace, only loads components of libraries it knows, and
picks a component's loading method by finding its base class (ModelMixin, PreTrainedModel, PreTrainedTokenizer, which
`viscpm_hf/__init__.py` imports for this) in the component's library: all three must include ours, for local folders
and Hub repos alike. Idempotent.
"""

import diffusers
from diffusers.pipelines import pipeline_loading_utils

from ..pipelines.viscpm_paint import VisCPMPaintPipeline


def register() -> None:
    diffusers.VisCPMPaintPipeline = VisCPMPaintPipeline
    pipeline_loading_utils.LOADABLE_CLASSES.setdefault(
        "viscpm_hf",
        {
            "ModelMixin": ["save_pretrained", "from_pretrained"],
            "PreTrainedModel": ["save_pretrained", "from_pretrained"],
            "PreTrainedTokenizer": ["save_pretrained", "from_pretrained"],
        },
    )
