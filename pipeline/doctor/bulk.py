"""The bulk step: what a stream of images costs through the real upscale graph, the figure a bulk user pays for.

The upscale workflow's stage graph (`pipeline.graph.StageGraph`: decode → encode with the VAE encoder and the
caption encoder → diffuse → merge, PNG out) runs in the local loop over a stream of PNG images, with every model
built with random weights at its real size: the preset's PiD network (N(0, 0.02), bf16, our Triton kernels on a GPU,
no torch.compile), the Flux VAE encoder (its own init, fp32, as pidray runs it) and the Gemma-2-2B decoder class of
transformers at the released configuration (fp32, its own init). Only where the models come from differs from a job:
no weights are read. There is no tokenizer file on a GPU machine either: a stand-in cuts words and punctuation into
token ids, so the caption's sequence is about as long as Gemma's tokenizer makes it; with the caption encoder's cache
a stream with one caption pays for one Gemma forward, in its first image (`gemma_s_first_image`).

One image warms the graph (kernels autotuned, the caption encoded), then the stream is timed:
- images_per_s: timed images over the stream's wall time;
- busy_share: time inside the PiD network's calls over the wall time, measured with CUDA events around each call
  (on a CPU, with the clock); model_busy_share adds the VAE encoder's and Gemma's calls;
- stage_share / host_share_by_stage: each stage's time (as the graph records it per row) over the wall time, and
  the part of it outside the models' calls;
- peak_gib: the GPU's peak allocated memory over the stream (on a CPU, the process's peak resident memory);
- cost_per_1000_images: 1,000 images' GPU-hours at `--price-per-gpu-hour`.
`--smoke` runs the same on the CPU with tiny configurations of the same classes.
"""

from __future__ import annotations

import dataclasses
import io
import re
import time

import torch

from pipeline.doctor.common import build_net, sync, triton_runs
from pipeline.doctor.harness import Check
from pipeline.doctor.plan import BULK_CASES, bulk_images, bulk_label

# Gemma-2-2B's decoder as released (the caption encoder of the PiD presets; its config.json)
GEMMA_2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                  query_pre_attn_scalar=256, sliding_window=4096)  # fmt: skip
SMOKE = {"flux-2k": ((64, 64), 16), "flux-2kto4k-v1.5": ((64, 64), 24)}  # envelope, input side: 1 tile, 2×2 tiles


class StandInTokenizer:
    """What CaptionEncoder asks of a tokenizer, without its files: words and punctuation marks as token ids, a BOS
    first, right padding to `max_length`. Token counts are close to Gemma's for English prose, not equal."""

    def __init__(self, vocab: int):
        self.vocab, self.padding_side = vocab, "right"

    def encode(self, text: str) -> list[int]:
        return [2] + [3 + hash(w) % (self.vocab - 3) for w in re.findall(r"\w+|[^\w\s]", text)]

    def __call__(self, texts, max_length: int, padding="max_length", truncation=True, return_tensors="pt"):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            tok = self.encode(t)[:max_length]
            ids[i, : len(tok)], mask[i, : len(tok)] = torch.tensor(tok), 1
        return type("Tokens", (), {"input_ids": ids, "attention_mask": mask})()


class Timed:
    """A model (or a model's method) with each call timed: CUDA events on a GPU (the device's own time, read at the
    end without syncing in between), the clock on a CPU. The network's LQ encodings and shift ensemble are its calls
    too (`METHODS`)."""

    METHODS = ("encode_lq", "encode_lq_shifted", "forward_shift_ensemble")

    def __init__(self, fn, device: torch.device):
        self._fn, self._cuda = fn, device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.events, self.cpu_s, self.calls = [], 0.0, 0

    def __getattr__(self, name):
        attr = getattr(self._fn, name)
        return self.timed(attr) if name in self.METHODS else attr

    def __call__(self, *a, **kw):
        return self.timed(self._fn)(*a, **kw)

    def timed(self, fn):
        def call(*a, **kw):
            self.calls += 1
            if self._cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*a, **kw)
                end.record()
                self.events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.cpu_s += time.perf_counter() - t0
            return out

        return call

    def seconds(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.events) / 1e3
        return self.cpu_s


def caption_encoder(c: Check, dim: int, length: int):
    """Gemma-2-2B's decoder class with random weights (the released config; a tiny one in a smoke run)."""
    from transformers import Gemma2Config, Gemma2Model

    from pipeline.encoders.text import CaptionEncoder

    kw = GEMMA_2_2B if not c.smoke else dict(vocab_size=512, hidden_size=dim, intermediate_size=2 * dim,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             head_dim=16, query_pre_attn_scalar=16, sliding_window=64)  # fmt: skip
    if kw["hidden_size"] != dim:
        raise ValueError(f"the caption encoder's width {kw['hidden_size']} is not the network's {dim}")
    torch.manual_seed(0)
    with torch.device(c.device):
        model = Gemma2Model(Gemma2Config(**kw))  # fp32, as pidray loads Gemma
    return CaptionEncoder(StandInTokenizer(kw["vocab_size"]), model, max_length=length)


def _preset(c: Check, name: str):
    from pipeline.model.presets import get_preset

    p = get_preset(name)
    if c.smoke:
        cfg = dataclasses.replace(c.cfg, lq_latent_channels=16) if c.cfg.lq_latent_channels != 16 else c.cfg
        p = dataclasses.replace(p, config=cfg, envelope=SMOKE[name][0], tile_overlap=1)
    return p


def _images(side: int, n: int) -> list[bytes]:
    """n PNGs of side² pixels: smooth random colour fields (compress like photos, not like noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _peak(c: Check) -> float:
    if c.device.type == "cuda":
        return torch.cuda.max_memory_allocated(c.device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_case(c: Check, name: str, side: int, shared: dict) -> dict:
    from pipeline.graph import StageGraph
    from pipeline.memory import default_budget
    from pipeline.runtime import ModelOptions, encoder_params, vae_dtype
    from pipeline.stages import diffuse as diffuse_mod
    from pipeline.stages import encode as encode_mod
    from pipeline.stages.common import UpscaleOptions
    from pipeline.stages.encode import plan_for
    from pipeline.workflow import Upscale

    preset, dev = _preset(c, name), c.device
    model = ModelOptions(preset=name, device=str(dev), compile=False)
    wf = Upscale(model, preset, UpscaleOptions())
    graph = StageGraph(workflow=wf)
    backend = "triton" if dev.type == "cuda" and triton_runs(dev) else "torch"

    def random_net(opts, p):
        return p, build_net(p.config, dev, c.dtype, backend)

    def random_vae(opts, p, gpu_share=1.0):
        from pipeline.encoders.flux_vae import FluxEncoder, FluxEncoderParams

        params = encoder_params(p)
        if c.smoke:
            params = FluxEncoderParams(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16)
        torch.manual_seed(0)
        with torch.device(dev):
            enc = FluxEncoder(params).to(vae_dtype(dev)).eval().requires_grad_(False)
        enc.memory_budget = default_budget(dev, gpu_share)
        return enc

    def random_captioner(opts, p):
        key = (p.config.txt_embed_dim, p.config.txt_max_length)
        if key not in shared:  # both presets caption with Gemma-2-2B: built once
            shared[key] = caption_encoder(c, *key)
        cap = shared[key]
        cap.model = getattr(cap.model, "_fn", cap.model)  # not the timed one of the case before
        cap.cache = type(cap.cache)(cap.cache.size)  # each case starts with an empty caption cache
        return cap

    saved = (diffuse_mod.load_net, encode_mod.load_lq_encoder, encode_mod.load_caption_encoder)
    t0 = time.perf_counter()
    try:
        diffuse_mod.load_net, encode_mod.load_lq_encoder = random_net, random_vae
        encode_mod.load_caption_encoder = random_captioner
        stages = graph.build_all()
    finally:
        diffuse_mod.load_net, encode_mod.load_lq_encoder, encode_mod.load_caption_encoder = saved
    build_s = time.perf_counter() - t0
    by_name = dict(zip(graph.names(), stages))
    enc_stage, dif_stage = by_name["encode"], by_name["diffuse"]
    timers = {"network": Timed(dif_stage.net, dev), "vae": Timed(enc_stage.encoder._encode, dev),
              "gemma": Timed(enc_stage.captioner.model, dev)}  # fmt: skip
    dif_stage.net, enc_stage.encoder._encode, enc_stage.captioner.model = (timers["network"], timers["vae"],
                                                                           timers["gemma"])  # fmt: skip
    n = bulk_images(name, c.full and not c.smoke)
    data = _images(side, n + 1)
    out_hw = (side * preset.scale,) * 2

    def check(rows):
        for r in rows:
            if r.get("status") != "ok" or tuple(r.get("out_hw", ())) != out_hw:
                raise RuntimeError(f"image {r.get('key')}: {r.get('status')} {r.get('error', '')} {r.get('out_hw')}")

    t0 = time.perf_counter()
    check(list(graph.run_local([{"key": "warm", "bytes": data[0]}], stages)))
    sync(dev)
    first_s = time.perf_counter() - t0
    gemma_first_s = timers["gemma"].seconds()
    for t in timers.values():
        t.reset()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    rows = list(graph.run_local([{"key": f"img{i}", "bytes": b} for i, b in enumerate(data[1:])], stages))
    sync(dev)
    wall = time.perf_counter() - t0
    check(rows)
    busy = {k: t.seconds() for k, t in timers.items()}
    stage_s = {s: sum(r.get("timings", {}).get(s, 0.0) for r in rows) for s in graph.names()}
    in_models = {"encode": busy["vae"] + busy["gemma"], "diffuse": busy["network"]}
    ips = n / wall
    r4 = lambda d: {k: round(v, 4) for k, v in d.items()}  # noqa: E731
    price = c.price if c.price is not None else 0.0
    return {
        "images": n, "in": f"{side}²", "out": f"{out_hw[0]}²", "tiles_per_image": plan_for(preset, wf.options,
                                                                                      (side, side)).n_tiles,
        "images_per_s": ips, "s_per_image": wall / n, "busy_share": busy["network"] / wall,
        "model_busy_share": sum(busy.values()) / wall,
        "stage_share": r4({s: v / wall for s, v in stage_s.items()}),
        "host_share_by_stage": r4({s: max(0.0, v - in_models.get(s, 0.0)) / wall for s, v in stage_s.items()}),
        "network_calls": timers["network"].calls, "gemma_calls": timers["gemma"].calls,
        "gemma_s_first_image": round(gemma_first_s, 3),
        "peak_gib": _peak(c), "peak_is": "GPU allocated" if dev.type == "cuda" else "process RSS (CPU)",
        "price_per_gpu_hour": price, "cost_per_1000_images": 1000 / ips / 3600 * price,
        "gpu_hours_per_1000_images": 1000 / ips / 3600,
        "first_image_s": round(first_s, 2), "build_s": round(build_s, 2),
        "weights": "random (no files read)", "kernels": backend, "compile": False,
    }  # fmt: skip


def step_bulk(c: Check, put) -> None:
    """Each (preset, input size) of `BULK_CASES` is an item: flux-2k 512² -> 2048², flux-2kto4k-v1.5 1024² -> 4096²
    (tiny stand-ins on the CPU in a smoke run)."""
    import gc

    from pipeline.model.presets import get_preset

    shared: dict = {}
    if c.device.type == "cuda":  # what earlier steps compiled or cached holds no memory the stream could use
        torch.compiler.reset()
        gc.collect()
        torch.cuda.empty_cache()
    for name, side in BULK_CASES:
        side = SMOKE[name][1] if c.smoke else side
        label = bulk_label(name, side, side * get_preset(name).scale)
        res = c.item(put, label, lambda name=name, side=side: run_case(c, name, side, shared))
        if res is not None:
            put(label, res)
    shared.clear()
    if c.device.type == "cuda":
        torch.cuda.empty_cache()
