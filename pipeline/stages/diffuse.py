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

from pipeline.errors import Cancelled
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

    def __call__(self, row: dict) -> dict:
        if is_failed(row):
            return row
        row = dict(row)
        t0 = time.perf_counter()
        try:
            item, steps = self.request(row)
            tiles = self.diffuse_many([item], steps=steps)[0]
        except USER_ERRORS as e:
            return failed(row, "diffuse", e)
        row.pop("latent")
        row.pop("caption_emb", None)
        row["tiles"] = tiles.numpy()
        row["seed"] = item[3]
        row.setdefault("timings", {})["diffuse"] = round(time.perf_counter() - t0, 4)
        return row

    def request(self, row: dict) -> tuple[tuple, int]:
        """A row's inputs: ((latent, caption emb, plan, seed, degrade_sigma), steps); row values override options."""
        o = self.options
        item = (
            torch.from_numpy(row["latent"]),
            torch.from_numpy(row["caption_emb"]),
            TilePlan.from_dict(row["plan"]),
            int(row.get("seed", o.seed)),
            float(row.get("degrade_sigma", o.degrade_sigma)),
        )
        return item, int(row.get("steps", o.steps))

    def _lq_tiles(self, latent: torch.Tensor, plan: TilePlan, seed: int, sigma: float) -> torch.Tensor:
        th, tw = plan.tile
        crops = torch.stack([latent[:, y : y + th, x : x + tw] for y, x in plan.origins()])
        if sigma > 0 and self.preset.vae != "rgb":
            vp = self.preset.latent_noise == "vp"
            if plan.n_tiles == 1:  # official: randn(latent.shape) from a generator seeded with the seed
                eps = torch.randn(crops.shape, generator=torch.Generator().manual_seed(seed))
            else:
                cells = CellNoise(mix(seed, "latent"), latent.shape[0])
                eps = torch.stack([cells.region(0, y, x, th, tw) for y, x in plan.origins()])
            crops = degrade_latent(crops, sigma, eps, variance_preserving=vp)
        return crops

    def _noise(self, plan: TilePlan, seed: int):
        if plan.n_tiles == 1:  # the official order: initial noise, then one draw per re-noising
            return GeneratorNoise((1, 3, *plan.tile_out), torch.Generator().manual_seed(seed))
        origins = [(y * plan.out_per_lat, x * plan.out_per_lat) for y, x in plan.origins()]
        return TileNoise(seed, origins, plan.tile_out)

    def diffuse(
        self, latent: torch.Tensor, y: torch.Tensor, plan: TilePlan, seed: int, sigma: float, steps: int | None = None
    ) -> torch.Tensor:
        """latent [C, h, w] covering plan.lat_hw; y [L, D] -> x0 tiles [N, 3, th, tw] in [-1, 1] (float32, CPU)."""
        return self.diffuse_many([(latent, y, plan, seed, sigma)], steps=steps)[0]

    @torch.inference_mode()
    def diffuse_many(self, items: list[tuple], steps: int | None = None, should_stop=None) -> list[torch.Tensor]:
        """Several images whose tiles share one shape, sampled together; each keeps its own noise and fusion.

        items: (latent, caption embedding, plan, seed, degrade_sigma) per image. Results are identical to
        running the images one by one: the batch only changes how many tiles go through the network at once.
        should_stop: checked before every network call (each step, each chunk of tiles); when it returns True
        the work stops with `Cancelled` (the endpoint uses it for timed-out and disconnected requests).
        """
        net, cfg = self.net, self.net.cfg
        shapes = {it[2].tile_out for it in items}
        if len(shapes) != 1:
            raise ValueError(f"diffuse_many needs one tile shape, got {sorted(shapes)}")
        out_hw = shapes.pop()
        lq, ys, sigmas, noises, spans = [], [], [], [], []
        start = 0
        for latent, y, plan, seed, sigma in items:
            if tuple(latent.shape[1:]) != plan.lat_hw:
                raise ValueError(f"latent {tuple(latent.shape[1:])} does not match the tile plan {plan.lat_hw}")
            lq.append(self._lq_tiles(latent.float(), plan, seed, sigma))
            n = plan.n_tiles
            ys.append(y[None].expand(n, -1, -1))
            sigmas.append(torch.full((n,), float(sigma)))
            noises.append(self._noise(plan, seed))
            spans.append((slice(start, start + n), plan))
            start += n
        lq, ys, sig = torch.cat(lq), torch.cat(ys), torch.cat(sigmas).to(self.device)
        N = start
        b = batch_size_for(cfg, out_hw, self.dtype, self.budget, n_tiles=N)
        dev = dict(device=self.device, dtype=self.dtype)
        rgb = self.preset.vae == "rgb"

        def features(c):
            part = lq[c].to(**dev)
            return net.encode_lq(out_hw, image=part) if rgb else net.encode_lq(out_hw, latent=part)

        chunks = [slice(i, min(i + b, N)) for i in range(0, N, b)]
        cached = [features(c) for c in chunks] if len(chunks) == 1 else None  # else recomputed per step

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            outs = []
            for k, c in enumerate(chunks):
                if should_stop is not None and should_stop():
                    raise Cancelled("stopped: the request was cancelled or its deadline passed")
                feats = cached[k] if cached is not None else features(c)
                outs.append(net(x[c].to(**dev), t[c].to(self.device), ys[c].to(**dev), feats, sig[c]).float().cpu())
            return torch.cat(outs)

        def noise(draw: int) -> torch.Tensor:
            return torch.cat([src(draw).reshape(-1, 3, *out_hw) for src in noises])

        fused = [(sl, plan, tile_weights(plan)) for sl, plan in spans if plan.n_tiles > 1 and self.options.fusion]

        def on_x0(step, x0):
            for sl, plan, weights in fused:
                x0[sl] = crop_tiles(blend(x0[sl], plan, weights), plan)
            return x0

        out = sample(predict, noise, steps=steps or self.options.steps, mode=self.options.sampler,
                     prediction=cfg.prediction_type, on_x0=on_x0 if fused else None)  # fmt: skip
        return [out[sl] for sl, _ in spans]
