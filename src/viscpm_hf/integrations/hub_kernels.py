"""transformers 5.25 kernelizes models in `from_pretrained` by default, fetching kernels from the Hub
(`USE_HUB_KERNELS`, default YES; bitsandbytes does the same for its CPU kernels when `kernels` is installed).
Offline there is no Hub: the project's entry points turn the fetching off unless the user chose."""

import os

from huggingface_hub import constants


def disable_hub_kernels_when_offline() -> None:
    """`USE_HUB_KERNELS=NO` when `HF_HUB_OFFLINE` is set and the user did not set `USE_HUB_KERNELS` themselves."""
    if constants.HF_HUB_OFFLINE:
        os.environ.setdefault("USE_HUB_KERNELS", "NO")
