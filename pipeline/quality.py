"""Super-resolution quality: the degradation we train and evaluate with, PSNR(Y)/SSIM, bundled photos.

The photos are scikit-image's bundled sample images (no download). `HOLDOUT` is never trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HOLDOUT = ("chelsea", "coffee")
_PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field", "ihc",
    "moon", "motorcycle_left", "motorcycle_right", "retina", "rocket", "page", "text", "cell", "color", "horse",
)  # fmt: skip


def photo_dir() -> Path:
    import skimage

    return Path(skimage.__file__).resolve().parent / "data"


def load_photo(name: str) -> torch.Tensor:
    """A bundled photo as [3, H, W] in [-1, 1] (grayscale repeated, alpha dropped)."""
    from PIL import Image

    path = next(p for p in photo_dir().glob(f"{name}.*") if p.suffix in (".png", ".jpg"))
    img = Image.open(path)
    img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_photos(exclude=(), min_size: int = 0) -> list[torch.Tensor]:
    out = []
    for name in _PHOTOS:
        if name in exclude:
            continue
        try:
            img = load_photo(name)
        except StopIteration:
            continue
        if min(img.shape[-2:]) >= min_size:
            out.append(img)
    return out


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels, as a stored LQ image is."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def make_lq(hq: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """Antialiased bicubic downscale by `scale`, quantised: the degradation the small model is trained on."""
    h, w = hq.shape[-2] // scale, hq.shape[-1] // scale
    return quantize(F.interpolate(hq, size=(h, w), mode="bicubic", antialias=True, align_corners=False))


def bicubic_up(lq: torch.Tensor, scale: int = 4) -> torch.Tensor:
    return F.interpolate(lq, scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)


def _y255(x: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> BT.601 luma in [16, 235] as float64 (the SR papers' Y channel)."""
    rgb = ((x.clamp(-1, 1) + 1) / 2).double().numpy()
    return 16.0 + 65.481 * rgb[0] + 128.553 * rgb[1] + 24.966 * rgb[2]


def psnr_y(a: torch.Tensor, b: torch.Tensor, shave: int = 4) -> float:
    ya, yb = _y255(quantize(a)), _y255(quantize(b))
    if shave:
        ya, yb = ya[shave:-shave, shave:-shave], yb[shave:-shave, shave:-shave]
    mse = np.mean((ya - yb) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim_y(a: torch.Tensor, b: torch.Tensor, shave: int = 4) -> float:
    from skimage.metrics import structural_similarity

    ya, yb = _y255(quantize(a)), _y255(quantize(b))
    if shave:
        ya, yb = ya[shave:-shave, shave:-shave], yb[shave:-shave, shave:-shave]
    return float(structural_similarity(ya, yb, data_range=255.0))


def grid_ratio(
    out: torch.Tensor, lq: torch.Tensor, period: int, scale: int = 4, shave: int = 8, offset: int = 0
) -> float:
    """How visible a `period`-pixel grid is in `out` [3, H, W] (e.g. the network's patch size): the mean |horizontal
    and vertical gradient| across the grid's lines ÷ the same everywhere else, measured on the luma of out minus
    bicubic ×`scale` of its input `lq`, so the image's own content cancels. 1.0: no grid; a visible grid: > 1.2.
    `offset` moves the lines (e.g. period/2: the lines of a grid shifted by half a patch)."""
    d = _y255(quantize(out)) - _y255(quantize(bicubic_up(lq[None], scale)[0]))
    if shave:
        d = d[shave:-shave, shave:-shave]
    gx, gy = np.abs(np.diff(d, axis=1)), np.abs(np.diff(d, axis=0))
    # the difference between columns j-1 and j sits at index j-1; a grid line lies before every multiple of period
    on_x = ((np.arange(gx.shape[1]) + 1 + shave - offset) % period) == 0
    on_y = ((np.arange(gy.shape[0]) + 1 + shave - offset) % period) == 0
    on = np.concatenate([gx[:, on_x].ravel(), gy[on_y, :].ravel()])
    off = np.concatenate([gx[:, ~on_x].ravel(), gy[~on_y, :].ravel()])
    return float(on.mean() / max(off.mean(), 1e-12))


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    _, h, w = img.shape
    size = min(size, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top : top + size, left : left + size]


@torch.inference_mode()
def upscale_tensor(net, lq: torch.Tensor, *, steps: int = 4, seed: int = 0) -> torch.Tensor:
    """One-tile 4× upscale of lq [B, 3, h, w] with an RGB-conditioned model and the default sampler."""
    from pipeline.model.sampler import GeneratorNoise, sample

    cfg = net.cfg
    B, _, h, w = lq.shape
    out_hw = (h * cfg.sr_scale, w * cfg.sr_scale)
    feats = net.encode_lq(out_hw, image=lq)
    dev = lq.device
    y = torch.zeros(B, cfg.txt_max_length, cfg.txt_embed_dim, device=dev)
    sigma = torch.zeros(B, device=dev)
    noise = GeneratorNoise((B, 3, *out_hw), torch.Generator(device=dev).manual_seed(seed), device=dev)
    return sample(lambda x, t: net(x, t, y, feats, sigma), noise, steps=steps, prediction=cfg.prediction_type)


def evaluate_net(net, *, size: int = 128, seed: int = 0, names=HOLDOUT, steps: int = 4) -> dict:
    """PSNR(Y)/SSIM of the model's 4× output and of bicubic on centre crops of held-out photos."""
    net.eval()
    rows = []
    for name in names:
        hq = center_crop(load_photo(name), size)[None]
        lq = make_lq(hq)
        out = upscale_tensor(net, lq.to(next(net.parameters()).device), seed=seed, steps=steps)[0].cpu()
        bic = bicubic_up(lq)[0]
        rows.append(
            {
                "image": name,
                "psnr_model": psnr_y(out, hq[0]),
                "psnr_bicubic": psnr_y(bic, hq[0]),
                "ssim_model": ssim_y(out, hq[0]),
                "ssim_bicubic": ssim_y(bic, hq[0]),
                "grid_ratio": grid_ratio(out, lq[0], net.cfg.patch_size),
            }
        )
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "image"}
    mean["psnr_gain"] = mean["psnr_model"] - mean["psnr_bicubic"]
    return {"rows": rows, "mean": mean}
