"""What every LQ encoder (VAE latent, representation grid or plain RGB) offers the pipeline.

The VAEs (flux_vae.py: Flux1/SD3/SDXL/Flux2; qwen_vae.py: Qwen-Image) implement `_encode` and inherit the
memory-bounded whole/tiled `encode`; the representation encoders (rae.py: DINOv2/SigLIP) encode whole images to one
fixed grid (`global_latent`).
"""

from __future__ import annotations

import torch


class LatentEncoder:
    """Mixin: `encode(image[-1,1]) -> latent`, `latent_channels`, `down_factor` (read from `self.params`, the
    encoder's parameter dataclass, unless a subclass sets them).

    A subclass implements `_encode` (one whole image). `encode` checks the input and encodes the whole image when
    its activations fit `memory_budget` (or no budget is set): the exact latent. Only an image that would not fit
    is encoded in tiles: each tile with `margin_px` of context on every side (clipped at the border), keeping its
    own part of the latent, so the memory is bounded by one tile. Convolutions then see the same pixels as untiled,
    but group norms and the mid-block attention see one tile instead of the whole image, which changes the latent
    (measured in `tests/test_latent_preset.py`): tiling is the fallback that makes a huge input possible, not the
    default.
    """

    memory_budget: int | None = None  # bytes the encode may use; None: always whole
    global_latent: bool = False  # True: one fixed grid for the whole image, not a latent per pixel block
    margin_px: int = 128  # context around a tile: covers a Flux-style encoder's convolutions (~100 input pixels)

    @property
    def latent_channels(self) -> int:
        return self.params.latent_channels

    @property
    def down_factor(self) -> int:
        return self.params.down_factor

    @property
    def act_channels(self) -> int:  # the widest full-resolution activation (the memory estimate)
        return self.params.act_channels

    def _encode(self, image: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def tile_for(self, H: int, W: int, dtype: torch.dtype = torch.float32) -> int | None:
        """None when the whole image fits the budget, else the largest tile side (multiple of 256) that does."""
        from pipeline.memory import vae_encode_bytes

        if self.memory_budget is None or self.down_factor == 1:
            return None
        if vae_encode_bytes((H, W), dtype, self.act_channels, tile_px=None) <= self.memory_budget:
            return None
        tile = max(H, W)
        while tile > 256 and vae_encode_bytes((H, W), dtype, self.act_channels, tile, self.margin_px) > \
                self.memory_budget:  # fmt: skip
            tile -= 256
        return max(256, tile - tile % 256)

    def encode(self, image: torch.Tensor, tile_px: int | None = -1) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] -> latent. tile_px: -1 decides from the memory budget, None encodes whole,
        a number forces tiles of that side."""
        self.check_image(image)
        H, W = image.shape[-2:]
        tile = self.tile_for(H, W, image.dtype) if tile_px == -1 else tile_px
        if not tile or max(H, W) <= tile + 2 * self.margin_px:
            return self._encode(image)
        f, m = self.down_factor, self.margin_px
        if tile % f or m % f:
            raise ValueError(f"tile {tile} and margin {m} must be multiples of the VAE factor {f}")
        out = None
        for y0 in range(0, H, tile):
            for x0 in range(0, W, tile):
                y1, x1 = min(H, y0 + tile), min(W, x0 + tile)
                ya, xa, yb, xb = max(0, y0 - m), max(0, x0 - m), min(H, y1 + m), min(W, x1 + m)
                lat = self._encode(image[:, :, ya:yb, xa:xb])
                if out is None:
                    out = lat.new_empty(*lat.shape[:2], H // f, W // f)
                out[:, :, y0 // f : y1 // f, x0 // f : x1 // f] = lat[
                    :, :, (y0 - ya) // f : (y1 - ya) // f, (x0 - xa) // f : (x1 - xa) // f
                ]
        return out

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
    act_channels = 3

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        return image


def strict_load(cls, params, tensors: dict[str, torch.Tensor], what: str, device="cpu", dtype=torch.float32):
    """`cls(params)` built on the meta device, then given exactly `tensors` (names and shapes must match; nothing
    missing, nothing extra), on `device` in `dtype`, in eval mode. what: the model's name for the error."""
    with torch.device("meta"):
        model = cls(params)
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise ValueError(f"{what} weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in tensors.items():
        if v.shape != want[k].shape:
            raise ValueError(f"{what} tensor {k}: shape {tuple(v.shape)} != {tuple(want[k].shape)}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, assign=True)
    return model.eval().requires_grad_(False)
