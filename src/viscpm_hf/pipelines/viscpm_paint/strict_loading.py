"""Loading VisCPM's own diffusers models all or nothing: a folder with missing or unexpected tensors is refused.

The diffusers counterpart of `viscpm_hf.models.strict_loading` (transformers models), with the same flag.
"""

import os

import torch


class StrictLoadingMixin:
    """Put before `ModelMixin` in a model class: its `from_pretrained` refuses weights that miss tensors of the model
    or hold others.

    diffusers' `ModelMixin.from_pretrained` only logs both lists and leaves the missing tensors empty (on the meta
    device), so a damaged folder loads and fails at the first call. `strict=False` loads what is there on purpose
    (e.g. to train the rest): missing tensors start as in a new model, unexpected ones are ignored.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, strict: bool = True, **kwargs):
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        missing, unexpected = sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", []))
        if (missing or unexpected) and strict:
            folder = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
            folder = os.path.normpath(folder)
            found = [
                f"{kind} tensors {names}" for kind, names in (("missing", missing), ("unexpected", unexpected)) if names
            ]
            raise RuntimeError(
                f"The weights in {folder} do not match {cls.__name__}: {' and '.join(found)}. The folder is incomplete "
                "or corrupt, or was saved from another configuration: save or convert it again. To load the tensors "
                "that are there on purpose (missing ones start as in a new model, unexpected ones are ignored), pass "
                f"strict=False to {cls.__name__}.from_pretrained; a pipeline takes the model as a component: "
                f"VisCPMPaintPipeline.from_pretrained(pipeline_folder, {os.path.basename(folder)}=model)."
            )
        if missing:
            _initialize_as_new(model, missing)
        return (model, info) if output_loading_info else model


def _initialize_as_new(model, names: list[str]) -> None:
    """Gives the tensors `names` of `model` (left on the meta device by the loader) the values of a new model."""
    new = type(model).from_config(model.config).state_dict()
    current = model.state_dict()
    device = next((t.device for t in current.values() if t.device.type != "meta"), torch.device("cpu"))
    values = {name: new[name].to(device=device, dtype=current[name].dtype) for name in names}
    model.load_state_dict(values, strict=False, assign=True)
