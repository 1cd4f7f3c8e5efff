"""What every LQ encoder (VAE latent or plain RGB) offers the pipeline.

Flux1/SD3 are implemented; Flux2's 128-channel BN VAE, SDXL and Qwen-Image plug in here by
implementing the same three members.
"""

from __future__ import annotations

import torch


class LatentEncoder:
    """Mixin: `encode(image[-1,1]) -> latent`, `latent_channels`, `down_factor`."""

    latent_channels: int
    down_factor: int

    def encode(self, image: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def check_image(self, image: torch.Tensor) -> None:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be [B, 3, H, W], got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        f = self.down_factor
        if h % f or w % f or h == 0 or w == 0:
            raise ValueError(f"image size {h}x{w} must be positive multiples of the VAE factor {f}")
        if not torch.isfinite(image).all():
            raise ValueError("image contains NaN or Inf")


class RGBEncoder(LatentEncoder):
    """For presets conditioned on the LQ RGB image itself: the 'latent' is the image."""

    latent_channels = 3
    down_factor = 1

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        self.check_image(image)
        return image
