"""DiffuseStage: the preset's sampler over images' tiles, batched across images, state kept on the model's device.

The sampler loop is the preset's sampling object's (`preset.sampling.run`, `pipeline.model.sampling`): the
distilled few-step one, or for the undistilled presets guided DPM-Solver++ (two forwards a step: the caption and the
null caption, with the same LQ condition). This stage hands it the network as a function of the tiles, the noise and
a hook that blends the overlapping tiles' x0 estimates after every step; every sampler draws its noise from the same
sources (the guided solver draws only its initial noise).

Rows are grouped by (tile shape, steps); each group's tiles go through the network in memory-sized batches,
whichever image they come from, while every image keeps its own noise and fusion. The sampler state (x, x0,
noise, fusion) stays on the model's device; the result leaves it once, as the blended, cropped canvas quantised
to the output's bit depth (uint8, or uint16 for 16-bit sources).

Noise: an image that is one tile draws exactly as the official sampler does from `seed` (initial noise, then
one draw per re-noising; the latent's degrade noise from its own generator), so a seed reproduces the official
result. Tiled images draw noise keyed to global canvas coordinates, so overlapping tiles see the same noise; with
`fusion`, the x0 estimates of overlapping tiles are blended after every step, so the tiles agree, and the last
blend is the output.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline import progress
from pipeline.errors import Cancelled
from pipeline.imageio import quantize
from pipeline.memory import batch_size_for, default_budget
from pipeline.model.guided import Guidance
from pipeline.model.presets import Preset
from pipeline.model.sampler import GeneratorNoise, degrade_latent
from pipeline.noise import TileNoise, mix
from pipeline.options import Resolved
from pipeline.runtime import ModelOptions, load_net
from pipeline.stages.common import Cancellable, UpscaleOptions, entered, failed
from pipeline.stages.rows import DiffusedRow, EncodedRow
from pipeline.tiling import TilePlan, blend, crop_tiles, planned_bucket_shapes, tile_origins, tile_weights

CPU_TILES_PER_CALL = int(os.environ.get("PIDRAY_CPU_TILES_PER_CALL", "4"))


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if dataclasses.is_dataclass(x):  # LQFeatures
        return [t for f in dataclasses.fields(x) for t in _tensors(getattr(x, f.name))]
    return []


@dataclass(frozen=True)
class DiffuseItem:
    """One image's sampler inputs, read from its row once."""

    latent: torch.Tensor  # [C, h, w] covering plan.lat_hw
    y: torch.Tensor  # caption embedding [L, D]
    plan: TilePlan
    seed: int
    sigma: float  # degrade_sigma
    steps: int
    noised: bool = False  # the latent is a captured x_t already at `sigma`: condition on it, add no noise
    guidance: Guidance | None = None  # the sampling's settings for this image (`Sampling.guidance`): guided presets'
    y_null: torch.Tensor | None = None  # the null caption embedding [L, D], for a sampling with `null_caption`
    key: str = ""  # the row's key: progress reports name the image


def _group(item: DiffuseItem) -> tuple:
    """What rows share to be sampled together (their tiles in the same network calls): tile shape, steps, guidance."""
    return item.plan.tile, item.steps, item.guidance


class DiffuseStage(Cancellable):
    def __init__(
        self,
        model: ModelOptions | None = None,
        options: Resolved | UpscaleOptions | None = None,  # the workflow's, resolved (plain ones are resolved here)
        memory_budget: int | None = None,
        loaded=None,  # (Preset, PidNet) already loaded, e.g. from a fixture
        gpu_share: float = 1.0,  # the fraction of its GPU the graph gives this stage (its memory budget)
        preset: Preset | None = None,  # resolved where the job or request entered; needed unless `loaded`
    ):
        self.model = model or ModelOptions()
        if loaded is None and preset is None:
            raise TypeError("DiffuseStage needs the resolved preset (preset=) or a loaded (preset, net)")
        self.preset, self.net = loaded if loaded is not None else load_net(self.model, preset)
        self.options = Resolved.of(options or UpscaleOptions(), self.preset)  # the job-wide settings it reads
        p = next(self.net.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.budget = memory_budget or default_budget(self.device, gpu_share)
        self.cancelled: dict[str, None] = {}  # request ids whose callers went away (oldest first, capped)
        self.stopped = 0  # rows whose work was skipped or stopped because they were cancelled or past deadline

    # ------------------------------------------------------------------ the stage interface (rows)
    def process(self, row: EncodedRow) -> DiffusedRow:
        return self.process_batch([row])[0]

    def process_batch(self, rows: list[EncodedRow]) -> list[DiffusedRow]:
        """Rows with a latent, caption embedding and plan -> rows with `pixels` ([H, W, 3] uint8/uint16).

        A row whose request was cancelled or whose deadline passed is returned failed without costing compute;
        a group whose every row is gone stops between steps. Other errors raise (the driver isolates them).
        """
        items = [self.request(r) for r in rows]
        out: list[dict | None] = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            if self._gone(rows[i]):
                self.stopped += 1
                out[i] = failed(rows[i], "diffuse", Cancelled("cancelled or past its deadline: not run"))
            else:
                groups.setdefault(_group(it), []).append(i)
        for (_, steps, _), idx in groups.items():
            stop = lambda idx=idx: all(self._gone(rows[i]) for i in idx)  # noqa: E731
            t0 = time.perf_counter()
            try:
                canvases = self.diffuse_many([items[i] for i in idx], steps=steps, should_stop=stop)
            except Cancelled as e:  # every row of the group is gone: stopped between steps
                self.stopped += len(idx)
                for i in idx:
                    out[i] = failed(rows[i], "diffuse", e)
                continue
            group_s, group_tiles = time.perf_counter() - t0, sum(items[i].plan.n_tiles for i in idx)
            for i, canvas in zip(idx, canvases):
                r = {k: v for k, v in rows[i].items() if k not in ("latent", "caption_emb")}
                src = r.get("src")
                r["pixels"] = quantize(canvas, src.bits if src is not None else 8)
                r["seed"], r["batch"] = items[i].seed, len(idx)
                r["work_s"] = group_s * items[i].plan.n_tiles / group_tiles  # its tiles' part of its group's calls
                out[i] = r
        for r in rows:
            self.cancelled.pop(r.get("request_id"), None)
        spent = sum(r.get("work_s", 0.0) for r in out)
        for r in out:  # run_stage gives each row this part of the call's time (its tiles' part of each call)
            if "work_s" in r:
                r["work_share"] = r.pop("work_s") / spent if spent > 0 else 1 / len(out)
        return out

    def batch_parts(self, rows: list[EncodedRow]) -> list[list[int]]:
        """The parts `process_batch` runs these rows in, as their indices, in its order: each group of rows that share
        their network calls (one tile shape, steps and guidance). A part run as a batch of its own gives the same
        rows, so a driver may run the parts one at a time and pass each on as soon as it is done: its images are
        written while the next part diffuses (the local loop and Ray Data do). A row that cannot be read is a part
        of its own (the envelope fails it alone)."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            try:
                key = _group(self.request(r))
            except Exception:  # a row whose request cannot be read is a part of its own: the envelope fails it alone
                key = ("unreadable", i)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def warmup(self, force: bool = False) -> bool:
        """One step per tile shape this stage expects, before a replica reports ready or an actor takes work, so no
        request pays for loading kernels (Triton compiles and autotunes on a GPU) or compiling the network: the
        envelope's size, or with `tile_buckets` every bucket shape — each at one and two tiles a call when the
        network is compiled (the second call makes the batch size dynamic, one graph for every batch). On a CPU
        there is nothing to load and the step would only delay the first row: skipped unless `force`. True when
        it ran."""
        if self.device.type == "cpu" and not force:
            return False
        cfg = self.net.cfg
        channels = 3 if self.preset.family.pixels else cfg.lq_latent_channels
        y = torch.zeros(cfg.txt_max_length, cfg.txt_embed_dim)
        g = self.preset.sampling.warm_guidance()  # every kind of network call a step makes
        batches = (1, 2) if getattr(self.net, "_compiled_call_impl", None) is not None else (1,)
        out_per_lat = cfg.sr_scale * self.preset.lq_unit
        for th, tw in self.warm_shapes():
            plan = TilePlan((th, tw), 1, out_per_lat, cfg.sr_scale, (th, tw), (th, tw), (1, 1))
            for b in batches:
                item = DiffuseItem(torch.zeros(channels, th, tw), y, plan, 0, 0.0, 1, guidance=g, y_null=y)
                self.diffuse_many([item] * b, steps=1)
        return True

    def warm_shapes(self) -> list[tuple[int, int]]:
        """The tile shapes (latent pixels) warmup runs: the bucket shapes the planner chooses from under these
        options (`--tile` included), or the default tile's square."""
        from pipeline.stages.encode import tiling_settings

        settings = tiling_settings(self.preset, self.options)
        if self.options.tile_buckets:
            return list(planned_bucket_shapes(**settings))
        lat = settings["tile_out"] // (self.net.cfg.sr_scale * self.preset.lq_unit)
        return [(lat, lat)]

    def request(self, row: dict) -> DiffuseItem:
        """A row's sampler inputs, from its options resolved where it entered (the sampling's settings for the plan's
        output size: a guided preset's dynamic shift is resolved here)."""
        o = entered(row)
        plan = row["plan"]
        sampling = self.preset.sampling
        if sampling.null_caption and row.get("null_emb") is None:
            raise ValueError(f"{self.preset.name} samples with the null caption: its row needs the null caption "
                             f"embedding (null_emb) from the encode stage")  # fmt: skip
        return DiffuseItem(
            latent=torch.from_numpy(row["latent"]),
            y=torch.from_numpy(row["caption_emb"]),
            plan=plan,
            seed=o.seed,
            sigma=float(o.degrade_sigma),
            steps=o.steps,
            noised=bool(row.get("noised")),
            guidance=sampling.guidance(o, plan.out_hw),
            y_null=torch.from_numpy(row["null_emb"]) if sampling.null_caption else None,
            key=str(row.get("key", "")),
        )

    # ------------------------------------------------------------------ tensors
    def _lq_tiles(
        self, latent: torch.Tensor, plan: TilePlan, seed: int, sigma: float, noised: bool = False
    ) -> torch.Tensor:
        th, tw = plan.tile
        if noised:  # a captured x_t: PiD conditions on it at its sigma as it is (the official from_ldm path)
            sigma = 0.0
        aligned = tuple(latent.shape[1:]) == plan.lat_hw
        if not aligned and self.preset.family.pixels:
            raise ValueError(f"LQ image {tuple(latent.shape[1:])} does not match the tile plan {plan.lat_hw}")
        if not aligned and not self.preset.global_latent:
            # a latent decoded to an explicit output size: onto the plan's latent grid with the network's own rule
            # (nearest when a latent pixel spans several patches, as in every released layout; else bilinear)
            nearest = self.net.lq_proj.z_ratio > 1
            latent = F.interpolate(latent[None], size=plan.lat_hw, mode="nearest" if nearest else "bilinear",
                                   **({} if nearest else {"align_corners": False}))[0]  # fmt: skip
        if self.preset.global_latent:  # one grid for the whole image (DINOv2/SigLIP): the official order is
            # degrade noise on the grid itself (randn of its shape from the seeded generator), then the network's
            # nearest resize to the patch grid — here to the plan's canvas, one latent pixel per patch, so every
            # tile gets its part of the one resize and the tiles' own alignment is the identity
            if sigma > 0:
                eps = torch.randn(latent[None].shape, generator=torch.Generator().manual_seed(seed))
                latent = degrade_latent(latent[None], sigma, eps, variance_preserving=False)[0]
            latent = F.interpolate(latent[None], size=plan.lat_hw, mode="nearest")[0]
            return torch.stack([latent[:, y : y + th, x : x + tw] for y, x in plan.origins()])
        crops = torch.stack([latent[:, y : y + th, x : x + tw] for y, x in plan.origins()])
        if sigma > 0 and not self.preset.family.pixels:
            vp = self.preset.noise.variance_preserving
            if plan.n_tiles == 1:  # official: randn(latent.shape) from a generator seeded with the seed
                eps = torch.randn(crops.shape, generator=torch.Generator().manual_seed(seed))
            else:  # keyed to latent canvas coordinates, like the sampler's noise
                eps = TileNoise(mix(seed, "latent"), plan.origins(), plan.tile, latent.shape[0])(0)
            crops = degrade_latent(crops, sigma, eps, variance_preserving=vp)
        return crops

    def _noise(self, plan: TilePlan, seed: int):
        """The image's noise source, drawing where the model runs. One tile: the official order (initial noise,
        then one draw per re-noising) from a generator on the model's device — the CPU's is the one the golden
        fixtures pin; the meta device (hot-path counting) has none and draws shapes only. Several tiles: noise keyed
        to global canvas coordinates, computed on the device."""
        dev = self.device
        if plan.n_tiles == 1:
            gen = None if dev.type == "meta" else torch.Generator(device=dev).manual_seed(seed)
            return GeneratorNoise((1, 3, *plan.tile_out), gen, device=dev)
        origins = [(y * plan.out_per_lat, x * plan.out_per_lat) for y, x in plan.origins()]
        return TileNoise(seed, origins, plan.tile_out, device=dev)

    def diffuse(self, latent: torch.Tensor, y: torch.Tensor, plan: TilePlan, seed: int, sigma: float,
                y_null: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """latent [C, h, w] covering plan.lat_hw; y [L, D] (and for a guided preset the null caption y_null) -> the
        output canvas [3, H, W] in [-1, 1] (model device), under the stage's options."""
        o, sampling = self.options, self.preset.sampling
        steps = o.steps
        if sampling.null_caption and y_null is None:
            raise ValueError(f"{self.preset.name} samples with the null caption: pass its embedding y_null")
        g = sampling.guidance(o, plan.out_hw)
        return self.diffuse_many([DiffuseItem(latent, y, plan, seed, sigma, steps, guidance=g, y_null=y_null)],
                                 steps=steps)[0]  # fmt: skip

    @torch.inference_mode()
    def diffuse_many(self, items: list[DiffuseItem], steps: int, should_stop=None) -> list[torch.Tensor]:
        """Several images whose tiles share one shape, sampled together; each keeps its own noise and fusion.

        Returns each image's blended canvas cropped to its output size, [3, H, W] float32 in [-1, 1], on the
        model's device. Identical to running the images one by one: the batch only changes how many tiles go
        through the network at once. should_stop: checked before every network call; True stops with `Cancelled`.
        """
        net, cfg, dev = self.net, self.net.cfg, self.device
        shapes = {it.plan.tile_out for it in items}
        if len(shapes) != 1:
            raise ValueError(f"diffuse_many needs one tile shape, got {sorted(shapes)}")
        out_hw = shapes.pop()
        guides = {it.guidance for it in items}
        if len(guides) != 1:
            raise ValueError(f"diffuse_many needs one guidance setting, got {guides}")
        guidance = guides.pop()
        sampling = self.preset.sampling
        lq, ys, ys_null, sigmas, noises, spans = [], [], [], [], [], []
        start = 0
        for it in items:
            lq.append(self._lq_tiles(it.latent.float(), it.plan, it.seed, it.sigma, it.noised))
            n = it.plan.n_tiles
            ys.append(it.y[None].expand(n, -1, -1))
            if sampling.null_caption:
                ys_null.append(it.y_null[None].expand(n, -1, -1))
            sigmas.append(torch.full((n,), float(it.sigma)))
            noises.append(self._noise(it.plan, it.seed))
            spans.append((slice(start, start + n), it.plan))
            start += n
        # every input reaches the device once, before the first step
        lq, ys, sig = torch.cat(lq).to(dev), torch.cat(ys).to(dev, self.dtype), torch.cat(sigmas).to(dev)
        ys_null = torch.cat(ys_null).to(dev, self.dtype) if ys_null else None
        N = start
        b = batch_size_for(cfg, out_hw, self.dtype, self.budget, n_tiles=N)
        if dev.type == "cpu":  # measured: on a CPU larger calls only thrash the caches (batching pays on a GPU)
            b = min(b, CPU_TILES_PER_CALL)
        rgb = self.preset.family.pixels
        shift = self.options.ensemble

        def features(c):
            part = lq[c].to(dev, self.dtype)
            if shift:
                return net.encode_lq(out_hw, image=part), net.encode_lq_shifted(out_hw, part, shift)
            return net.encode_lq(out_hw, image=part) if rgb else net.encode_lq(out_hw, latent=part)

        chunks = [slice(i, min(i + b, N)) for i in range(0, N, b)]
        first = features(chunks[0])  # LQ features once per image, kept for every step when they fit the budget
        keep = len(chunks) * sum(t.numel() * t.element_size() for t in _tensors(first)) <= self.budget // 4
        cached = [first] + [features(c) for c in chunks[1:]] if keep else None  # else recomputed per step

        def predict(x: torch.Tensor, t: torch.Tensor, null: bool = False) -> torch.Tensor:
            y = ys_null if null else ys
            outs = []
            for k, c in enumerate(chunks):
                if should_stop is not None and should_stop():
                    raise Cancelled("stopped: the request was cancelled or its deadline passed")
                feats = cached[k] if cached is not None else features(c)
                if shift:
                    pred = net.forward_shift_ensemble(x[c].to(self.dtype), t[c], y[c], *feats, sig[c], shift)
                else:
                    pred = net(x[c].to(self.dtype), t[c], y[c], feats, sig[c])
                outs.append(pred.float())
                for k, (sl, _) in enumerate(spans):  # each image's tiles in this call: its tile-step progress
                    n = min(sl.stop, c.stop) - max(sl.start, c.start)
                    if n > 0:
                        progress.report(items[k].key, n)
            return torch.cat(outs)

        def noise(draw: int) -> torch.Tensor:  # every source draws on the device: nothing crosses per step
            return torch.cat([src(draw).reshape(-1, 3, *out_hw) for src in noises])

        weights = {k: (*(w.to(dev) for w in tile_weights(plan)), tile_origins(plan, dev))
                   for k, (_, plan) in enumerate(spans)}  # fmt: skip
        fused = [k for k, (_, plan) in enumerate(spans) if plan.n_tiles > 1 and self.options.fusion]
        last, final = steps - 1, {}

        def on_x0(step, x0):
            for k in fused:
                sl, plan = spans[k]
                canvas = blend(x0[sl], plan, weights[k])
                if step == last:
                    final[k] = canvas  # the last blend is the output: no second blend
                else:
                    x0[sl] = crop_tiles(canvas, plan)
            return x0

        out = sampling.run(predict, noise, steps=steps, guidance=guidance, options=self.options,
                           prediction=cfg.prediction_type, dtype=self.dtype, on_x0=on_x0 if fused else None,
                           should_stop=should_stop)  # fmt: skip
        canvases = []
        for k, (sl, plan) in enumerate(spans):
            if k in final:
                canvas = final[k].clamp(-1, 1)
            elif plan.n_tiles == 1:
                canvas = out[sl][0]
            else:
                canvas = blend(out[sl], plan, weights[k])
            canvases.append(canvas[:, : plan.out_hw[0], : plan.out_hw[1]])
        return canvases
