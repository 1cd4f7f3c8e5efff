"""What a sampler step costs outside the network, measured without a GPU: the `hot_path` section of the report.

- Per step, on the device path: host RNG draws, host-to-device copies and device-to-host syncs, counted by a torch
  function mode around the real diffuse stage (the tiny config) with its network stubbed on the meta device — the
  stand-in for an accelerator: any host tensor reaching it is a copy, any value read back a sync (and fails). The
  network's own calls are not counted; the per-step figure is (4-step run − 1-step run) / 3, for one and several
  tiles at batches 1, 2 and 4.
- `autotune_key_sets`: the distinct autotune keys the fused kernels would see in one full-size flux-2k forward
  (2048²) at batches 1, 2 and 4 — from the ops' key functions while the network runs on the meta device.
- `distinct_tile_shapes`: the tile shapes that `pipeline.tiling.COMMON_SIZES` give per preset with tile buckets
  (and, beside them, without).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

BUCKET_PRESETS = ("flux-2k", "flux-2kto4k-v1.5")
RNG = {"randn", "rand", "randint", "randperm", "normal", "normal_", "uniform_", "bernoulli", "bernoulli_",
       "multinomial", "exponential_", "random_", "randn_like", "rand_like"}  # fmt: skip
MOVES = {"to", "cuda", "cpu", "copy_"}
READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "equal"}


def _dev(x) -> str | None:
    return x.device.type if isinstance(x, torch.Tensor) else None


class HostTraffic(TorchFunctionMode):
    """Counts host RNG draws, host→device copies and device→host reads among the torch calls made under it.

    At the torch-function level (what Python code calls), so it sees `.to()` under inference mode too."""

    def __init__(self):
        super().__init__()
        self.paused = 0
        self.counts = {"host_rng_draws": 0, "host_to_device_copies": 0, "device_to_host_syncs": 0}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if not self.paused and name in READS and _dev(first) not in ("cpu", None):
            self.counts["device_to_host_syncs"] += 1  # counted first: on the meta device the read then fails
        out = func(*args, **kwargs)
        if self.paused:
            return out
        if name in RNG and _dev(out if isinstance(out, torch.Tensor) else first) == "cpu":
            self.counts["host_rng_draws"] += 1
        elif name in MOVES:
            src, dst = (args[1], args[0]) if name == "copy_" else (first, out)
            if _dev(src) == "cpu" and _dev(dst) not in ("cpu", None):
                self.counts["host_to_device_copies"] += 1
            elif _dev(src) not in ("cpu", None) and _dev(dst) == "cpu":
                self.counts["device_to_host_syncs"] += 1
        return out


class _Uncounted:
    """The network with counting paused inside its calls (what the network does is not the hot path's)."""

    def __init__(self, net, mode: HostTraffic):
        self._net, self._mode = net, mode

    def __getattr__(self, name):
        attr = getattr(self._net, name)
        if name in ("encode_lq", "encode_lq_shifted", "forward_shift_ensemble"):
            return self._paused(attr)
        return attr

    def _paused(self, fn):
        def call(*a, **kw):
            self._mode.paused += 1
            try:
                return fn(*a, **kw)
            finally:
                self._mode.paused -= 1

        return call

    def __call__(self, *a, **kw):
        return self._paused(self._net)(*a, **kw)


class StubNet(torch.nn.Module):
    """The network's interface on the meta device, doing one element-wise op per call: what the stage does around
    the network is what is measured (the real network checks its inputs' values once per call, which meta cannot)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.w = torch.nn.Parameter(torch.ones((), device="meta"), requires_grad=False)
        self.lq_proj = torch.nn.Module()
        self.lq_proj.z_ratio = 1

    def encode_lq(self, out_hw, image=None, latent=None):
        return (latent if latent is not None else image) * self.w

    def forward(self, x, t, y, feats, sigma):
        return x * self.w  # -> [N, 3, th, tw] like the network's prediction


def _meta_stage(cfg):
    import dataclasses

    from pipeline.model.presets import get_preset
    from pipeline.stages.diffuse import DiffuseStage

    net = StubNet(cfg)
    preset = dataclasses.replace(get_preset("flux-2k"), config=cfg, text_encoder="none")
    return DiffuseStage(loaded=(preset, net), memory_budget=1 << 40), net


def per_step_traffic(cfg, tile: int = 128) -> dict:
    """Counts per sampler step outside the network, for one tile and 2×2 tiles, at batches 1, 2 and 4."""
    from pipeline.stages.diffuse import DiffuseItem
    from pipeline.tiling import TilePlan

    stage, net = _meta_stage(cfg)
    lat, unit, f = tile // cfg.latent_factor, cfg.latent_spatial_down_factor, cfg.latent_factor
    plans = {"1 tile": TilePlan((lat * unit,) * 2, unit, f, cfg.sr_scale, (lat, lat), (lat, lat), (1, 1)),
             "2x2 tiles": TilePlan(((2 * lat - 1) * unit,) * 2, unit, f, cfg.sr_scale, (lat, lat), (lat - 1,) * 2,
                                   (2, 2))}  # fmt: skip
    chans = cfg.lq_latent_channels or cfg.lq_in_channels
    y = torch.zeros(cfg.txt_max_length, cfg.txt_embed_dim)
    detail, worst = {}, {}
    for pname, plan in plans.items():
        for batch in (1, 2, 4):
            items = [DiffuseItem(torch.zeros(chans, *plan.lat_hw), y, plan, i, 0.1, 4) for i in range(batch)]
            counts = {}
            for steps in (1, 4):
                with HostTraffic() as mode:
                    stage.net = _Uncounted(net, mode)
                    try:
                        stage.diffuse_many(items, steps=steps)
                    finally:
                        stage.net = net
                counts[steps] = mode.counts
            per = {k: (counts[4][k] - counts[1][k]) / 3 for k in counts[1]}
            per = {k: int(v) if float(v).is_integer() else v for k, v in per.items()}
            detail[f"{pname}, batch {batch}"] = per
            for k, v in per.items():
                worst[k] = max(worst.get(k, 0), v)
    return {**{f"{k}_per_step": v for k, v in worst.items()}, "per_case": detail}


class _KeyRecorder:
    """An `Ops` whose methods record the autotune key their fused launch would use, then run the reference."""

    def __init__(self):
        from pipeline.kernels import TorchOps

        self._ref, self.keys, self.row_keyed = TorchOps(), set(), set()

    def __getattr__(self, name):
        from pipeline.kernels import tune_keys

        fn = getattr(self._ref, name)

        def call(*a, **kw):
            key = tune_keys(name, *a, **kw)
            if key is not None:
                self.keys.add(key)
                x = a[0]
                self.row_keyed.add((key[0], x.shape[-1], x.numel() // x.shape[-1]))  # keyed on the exact row count
            return fn(*a, **kw)

        return call


def autotune_key_sets(size: int = 2048, batches=(1, 2, 4)) -> dict:
    """Distinct autotune keys of one full-size flux-2k forward per batch size, computed on the meta device."""
    from pipeline.model.network import LQFeatures, PidNet
    from pipeline.model.presets import get_preset

    cfg = get_preset("flux-2k").config
    sets, old = {}, {}
    for b in batches:
        ops = _KeyRecorder()
        with torch.device("meta"):
            net = PidNet(cfg, ops=ops, dtype=torch.bfloat16).eval().requires_grad_(False)
            x = torch.zeros(b, 3, size, size, dtype=torch.bfloat16)
            lat = torch.zeros(b, cfg.lq_latent_channels, size // cfg.latent_factor, size // cfg.latent_factor,
                              dtype=torch.bfloat16)  # fmt: skip
            y = torch.zeros(b, cfg.txt_max_length, cfg.txt_embed_dim, dtype=torch.bfloat16)
            t, s = torch.zeros(b), torch.zeros(b)
            with torch.inference_mode():  # encode_lq without its value check (meta tensors have no values)
                lq = LQFeatures(*net.lq_proj(lat, None, *net.grid(size, size)), None)
                net(x, t, y, lq, s)
        sets[str(b)], old[str(b)] = ops.keys, ops.row_keyed
    return {
        "autotune_key_sets": {k: len(v) for k, v in sets.items()},
        "autotune_keys_equal_across_batches": all(v == sets[str(batches[0])] for v in sets.values()),
        # the same launches keyed on the exact row count, as the row kernels were: new keys for every batch size
        "row_count_keys_before": {k: len(v) for k, v in old.items()},
        "row_count_keys_before_all_batches": len(set().union(*old.values())),
        "autotune_keys_all_batches": len(set().union(*sets.values())),
    }


def tile_shapes(sizes=None, presets=BUCKET_PRESETS) -> dict:
    """Distinct tile shapes and pixels diffused per output pixel over `sizes`, with and without tile buckets."""
    from pipeline.model.presets import get_preset
    from pipeline.stages.common import UpscaleOptions
    from pipeline.stages.encode import plan_for
    from pipeline.tiling import COMMON_SIZES, diffused_pixels

    sizes = sizes or COMMON_SIZES
    counts, detail = {}, {}
    for name in presets:
        p = get_preset(name)
        for buckets in (True, False):
            o = UpscaleOptions(max_output_side=1 << 20, tile_buckets=buckets)
            plans = [plan_for(p, o, (h, w)) for w, h in sizes]
            shapes = {pl.tile_out for pl in plans}
            ratio = sum(map(diffused_pixels, plans)) / sum(pl.out_hw[0] * pl.out_hw[1] for pl in plans)
            worst = max(diffused_pixels(pl) / (pl.out_hw[0] * pl.out_hw[1]) for pl in plans)
            key = name if buckets else f"{name} (even split)"
            if buckets:
                counts[name] = len(shapes)
            detail[key] = {"shapes": len(shapes), "diffused_per_output_px": round(ratio, 3),
                           "worst_image": round(worst, 3), "tile_shapes": sorted(shapes)}  # fmt: skip
    return {"distinct_tile_shapes": counts, "tile_buckets": detail,
            "image_sizes": [f"{w}x{h}" for w, h in sizes]}  # fmt: skip


def measure(cfg) -> dict:
    traffic = per_step_traffic(cfg)
    keys = autotune_key_sets()
    shapes = tile_shapes()
    return {**{k: v for k, v in traffic.items() if k != "per_case"}, **keys, **shapes,
            "per_case": traffic["per_case"]}  # fmt: skip


def step_hot_path(c, put) -> None:
    """The `hot_path` section (CPU-measurable; also at the top level of doctor.json)."""
    from pipeline.doctor.common import tiny_config

    def hot_path():
        res = measure(tiny_config())
        c.report.data["hot_path"] = res
        for k, v in res.items():
            put(k, v)

    c.item(put, "hot_path", hot_path)
