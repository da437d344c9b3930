"""Strict loading for the models of this package: a folder whose tensors do not cover the model exactly is refused.

transformers initialises a tensor missing from a checkpoint at random, ignores one the model lacks, and only logs its
loading report; a VisCPM folder missing a tensor (a broken download, an interrupted copy) would then chat or paint with
random weights. Our models raise with the report's names instead, unless the caller asks for partial weights.
"""

import os
from typing import Any

from transformers import PreTrainedModel


MAX_LISTED = 50  # names per kind in the message; the logged report above it lists them all


class StrictLoadingMixin:
    """Put before `PreTrainedModel` in a model base class: its `from_pretrained` loads strictly."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None,
        *model_args: Any,
        strict: bool = True,
        **kwargs: Any,
    ):
        """transformers' `from_pretrained`, raising a `RuntimeError` that names the missing and unexpected tensors
        when the weights do not cover the model exactly. Tied weights (a head tied to the embeddings) are not missing,
        and a folder of this model's base or head class loads as transformers loads it (see `check_loading_info`).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`, *optional*):
                The model folder or Hub repo id, as for any model.
            model_args (`tuple`, *optional*):
                Passed on to `PreTrainedModel.from_pretrained`.
            strict (`bool`, defaults to `True`):
                `False` loads partial weights on purpose: missing tensors are initialised and unexpected ones ignored,
                as transformers does, with its loading report logged.
            kwargs (`dict[str, Any]`, *optional*):
                Passed on to `PreTrainedModel.from_pretrained`; `output_loading_info=True` returns the report as usual.

        Returns:
            (`PreTrainedModel` or `tuple`): The model, or `(model, loading_info)` with `output_loading_info=True`.

        Raises:
            RuntimeError: with `strict`, the weights do not cover the model exactly.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        if strict:
            check_loading_info(model, pretrained_model_name_or_path, loading_info)
        return (model, loading_info) if output_loading_info else model


def check_loading_info(model: PreTrainedModel, source: str | os.PathLike | None, info: dict) -> None:
    """Raises if `info` (what `from_pretrained(..., output_loading_info=True)` returns) has missing or unexpected
    tensors, except what transformers means to happen when the folder is another class's (its `architectures` name
    another class): a base model leaves out the head of a head class's folder, and a head class initialises its head
    (the tensors outside `base_model_prefix`) when loading a base model's folder. Missing base tensors always raise.

    Args:
        model (`PreTrainedModel`):
            The loaded model.
        source (`str` or `os.PathLike`, *optional*):
            Where it was loaded from, for the message.
        info (`dict`):
            The loading report, with `missing_keys` and `unexpected_keys`.

    Raises:
        RuntimeError: naming the missing and unexpected tensors (at most 50 of each kind) and what to do.
    """
    missing, unexpected = set(info["missing_keys"]), set(info["unexpected_keys"])
    if type(model).__name__ not in (model.config.architectures or [type(model).__name__]):
        if model.base_model is model:
            unexpected = set()
        else:
            missing = {key for key in missing if key.startswith(f"{model.base_model_prefix}.")}
    problems = [
        f"{kind} ({what}): {names_in_brief(names)}"
        for names, kind, what in [
            (missing, "missing", "they would be initialised at random"),
            (unexpected, "unexpected", "the model has no such tensors"),
        ]
        if names
    ]
    if problems:
        raise RuntimeError(
            f"{type(model).__name__}.from_pretrained({str(source)!r}): the weights do not match the model. "
            + "; ".join(problems)
            + ". The folder is incomplete or corrupt, or holds another model: download or convert it again. To load "
            "partial weights on purpose, pass strict=False."
        )


def names_in_brief(names) -> str:
    names = sorted(names)
    listed = ", ".join(names[:MAX_LISTED])
    return listed if len(names) <= MAX_LISTED else f"{listed} and {len(names) - MAX_LISTED} more"


__all__ = ["StrictLoadingMixin", "check_loading_info"]
