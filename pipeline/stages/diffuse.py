"""DiffuseStage: the distilled sampler over an image's tiles, in memory-sized batches of one tile shape.

Noise: an image that is one tile draws exactly as the official sampler does from `seed` (initial
noise, then one draw per re-noising; the latent's degrade noise from its own generator), so a
seed reproduces the official result. Tiled images draw noise keyed to global canvas coordinates,
so overlapping tiles see the same noise; with `fusion`, the x0 estimates of overlapping tiles
are averaged (feathered) after every step, so the tiles agree before they are merged.
"""

from __future__ import annotations

import time

import torch

from pipeline.memory import batch_size_for, default_budget
from pipeline.model.sampler import GeneratorNoise, degrade_latent, sample
from pipeline.noise import CellNoise, TileNoise, mix
from pipeline.runtime import ModelOptions, load_net
from pipeline.stages.common import USER_ERRORS, UpscaleOptions, failed, is_failed
from pipeline.tiling import TilePlan, blend, crop_tiles, tile_weights


class DiffuseStage:
    def __init__(
        self,
        model: ModelOptions | dict | None = None,
        options: UpscaleOptions | dict | None = None,
        memory_budget: int | None = None,
        loaded=None,  # (Preset, PidNet) already loaded, e.g. from a fixture
    ):
        self.model = model if isinstance(model, ModelOptions) else ModelOptions(**(model or {}))
        self.options = options if isinstance(options, UpscaleOptions) else UpscaleOptions(**(options or {}))
        self.preset, self.net = loaded if loaded is not None else load_net(self.model)
        p = next(self.net.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.budget = memory_budget or default_budget(self.device)
        self.last_batch_size = 0

    def __call__(self, row: dict) -> dict:
        if is_failed(row):
            return row
        row = dict(row)
        t0 = time.perf_counter()
        try:
            plan = TilePlan.from_dict(row["plan"])
            seed = int(row.get("seed", self.options.seed))
            sigma = float(row.get("degrade_sigma", self.options.degrade_sigma))
            tiles = self.diffuse(
                torch.from_numpy(row.pop("latent")), torch.from_numpy(row["caption_emb"]), plan, seed, sigma
            )
        except USER_ERRORS as e:
            return failed(row, "diffuse", e)
        row.pop("caption_emb", None)
        row["tiles"] = tiles.numpy()
        row["seed"] = seed
        row.setdefault("timings", {})["diffuse"] = round(time.perf_counter() - t0, 4)
        return row

    def _lq_tiles(self, latent: torch.Tensor, plan: TilePlan, seed: int, sigma: float) -> torch.Tensor:
        th, tw = plan.tile
        crops = torch.stack([latent[:, y : y + th, x : x + tw] for y, x in plan.origins()])
        if sigma > 0 and self.preset.latent_channels and self.preset.vae != "rgb":
            vp = self.preset.latent_noise == "vp"
            if plan.n_tiles == 1:  # official: randn(latent.shape) from a generator seeded with the seed
                eps = torch.randn(crops.shape, generator=torch.Generator().manual_seed(seed))
            else:
                cells = CellNoise(mix(seed, "latent"), latent.shape[0])
                eps = torch.stack([cells.region(0, y, x, th, tw) for y, x in plan.origins()])
            crops = degrade_latent(crops, sigma, eps, variance_preserving=vp)
        return crops

    @torch.inference_mode()
    def diffuse(self, latent: torch.Tensor, y: torch.Tensor, plan: TilePlan, seed: int, sigma: float) -> torch.Tensor:
        """latent [C, h, w] covering plan.lat_hw; y [L, D] -> x0 tiles [N, 3, th, tw] in [-1, 1] (float32, CPU)."""
        net, cfg = self.net, self.net.cfg
        if tuple(latent.shape[1:]) != plan.lat_hw:
            raise ValueError(f"latent {tuple(latent.shape[1:])} does not match the tile plan {plan.lat_hw}")
        lq = self._lq_tiles(latent.float(), plan, seed, sigma)
        N, out_hw = plan.n_tiles, plan.tile_out
        b = batch_size_for(cfg, out_hw, self.dtype, self.budget, n_tiles=N)
        self.last_batch_size = b
        dev = dict(device=self.device, dtype=self.dtype)
        rgb = self.preset.vae == "rgb"

        def features(chunk):
            part = lq[chunk].to(**dev)
            return net.encode_lq(out_hw, image=part) if rgb else net.encode_lq(out_hw, latent=part)

        chunks = [slice(i, min(i + b, N)) for i in range(0, N, b)]
        cached = [features(c) for c in chunks] if len(chunks) == 1 else None  # else recomputed per step
        y_dev = y[None].to(**dev)
        sig = torch.full((N,), sigma, device=self.device)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            outs = []
            for k, c in enumerate(chunks):
                n = c.stop - c.start
                feats = cached[k] if cached is not None else features(c)
                out = net(x[c].to(**dev), t[c].to(self.device), y_dev.expand(n, -1, -1), feats, sig[c])
                outs.append(out.float().cpu())
            return torch.cat(outs)

        if N == 1:
            noise = GeneratorNoise((1, 3, *out_hw), torch.Generator().manual_seed(seed))
        else:
            noise = TileNoise(
                seed, [(yy * plan.out_per_lat, xx * plan.out_per_lat) for yy, xx in plan.origins()], out_hw
            )
        on_x0 = None
        if N > 1 and self.options.fusion:
            weights = tile_weights(plan)

            def on_x0(step, x0):
                return crop_tiles(blend(x0, plan, weights), plan)

        return sample(predict, noise, steps=self.options.steps, mode=self.options.sampler,
                      prediction=cfg.prediction_type, on_x0=on_x0)  # fmt: skip
