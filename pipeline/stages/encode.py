"""EncodeStage: pixels -> tile plan, LQ latent (VAE) or RGB, caption embedding (cached)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pipeline.errors import BadParameter
from pipeline.model.presets import Preset
from pipeline.options import Resolved
from pipeline.runtime import ModelOptions, load_caption_encoder, load_lq_encoder, pick_device
from pipeline.stages.common import UpscaleOptions, entered
from pipeline.stages.rows import DecodedRow, EncodedRow
from pipeline.tiling import TilePlan, check_output_side, pad_image, plan_tiles, target_size


def tiling_settings(preset, options: Resolved) -> dict:
    """The tile geometry of a preset under these (resolved) options: the plan and the warm-up read it from here."""
    cfg, tile = preset.config, options.tile
    return dict(unit=preset.lq_unit, sr_scale=cfg.sr_scale, patch=cfg.patch_size, tile_out=tile,
                tile_min_out=min(tile, preset.envelope[0]), overlap=options.overlap)  # fmt: skip


def plan_for(preset, options: Resolved | UpscaleOptions, in_hw) -> TilePlan:
    """The tile plan of an input of in_hw pixels; needs no model (drivers use it for memory estimates). `options`: a
    row's (`Resolved`), or plain options resolved here against the preset (`Resolved.of`: callers with no row)."""
    options = Resolved.of(options, preset)
    return plan_tiles(tuple(in_hw), **tiling_settings(preset, options), max_output_side=options.max_output_side,
                      buckets=bool(options.tile_buckets))  # fmt: skip


def given_latent_in_hw(preset, latent_hw, out_size=None) -> tuple[int, int]:
    """The input size a given latent stands for: latent × the preset's input pixels per latent pixel, or an explicit
    output size ÷ the preset's scale (which must divide it)."""
    if out_size:
        sr = preset.scale
        h, w = (int(v) for v in out_size)
        if h % sr or w % sr or min(h, w) < sr:
            raise BadParameter(f"output size {w}x{h} must be positive multiples of the preset's scale {sr}")
        return h // sr, w // sr
    return latent_hw[0] * preset.lq_unit, latent_hw[1] * preset.lq_unit


class EncodeStage:
    """Decoded rows -> plan + LQ latent + caption embedding. With `lq=False` (the latent-decode workflow) the rows
    bring their latent (`LatentStage`) and only the plan and the caption are made here: no LQ encoder is loaded."""

    def __init__(self, model: ModelOptions, preset: Preset, options: UpscaleOptions, gpu_share: float = 1.0,
                 lq: bool = True):  # fmt: skip
        """model, preset, options: resolved where the job or request entered (the workflow); each row brings its
        own options (`opts`, from `Workflow.enter`)."""
        self.model, self.preset, self.options = model, preset, Resolved.of(options, preset)
        # its memory budget: the graph's share of a GPU
        self.encoder = load_lq_encoder(self.model, preset, gpu_share) if lq else None
        self.captioner = load_caption_encoder(self.model, preset)
        self.device = pick_device(self.model.device)
        self._null: np.ndarray | None = None

    def plan(self, in_hw):
        return plan_for(self.preset, self.options, in_hw)

    def _plan(self, row: dict, o: Resolved, in_hw) -> TilePlan:
        """The row's tile plan: the one made where it entered (`planned`, the endpoint's admission) when it is for
        this very size, else planned here."""
        planned = row.pop("planned", None)
        if isinstance(planned, TilePlan) and tuple(planned.in_hw) == tuple(in_hw):
            return planned
        return plan_for(self.preset, o, in_hw)

    def process(self, row: DecodedRow) -> EncodedRow:
        return self.process_batch([row])[0]

    @torch.inference_mode()
    def process_batch(self, rows: list[DecodedRow]) -> list[EncodedRow]:
        """Decoded rows -> rows with the tile plan, the LQ latent (or RGB) and the caption embedding.

        Captions are embedded in one call for the batch; images are encoded one by one (their sizes differ).
        """
        out = []
        for row in rows:
            row = dict(row)
            if "latent" in row:  # a given latent (pidray decode): its plan, padded to it
                out.append(self._given_latent(row))
                continue
            img = row.pop("image")
            o = entered(row)
            plan = self._plan(row, o, img.size)
            check_output_side(target_size(plan.in_hw, plan.sr_scale, o.scale), o.max_output_side)  # -s 16 too
            pixels = torch.from_numpy(pad_image(img.to_float(), plan.pad_hw))[None].to(self.device)
            row["latent"] = np.ascontiguousarray(self.encoder.encode(pixels)[0].float().cpu().numpy())
            row["plan"] = plan
            # metadata (mode, ICC, EXIF) and alpha for the merge; the pixels are not shipped further
            row["src"] = dataclasses.replace(img, rgb=img.rgb[:0, :0])
            out.append(row)
        captions = [entered(r).caption for r in out]
        if not captions:
            return out
        null = self.null_embedding()
        for row, emb in zip(out, self.captioner.encode(captions)):
            row["caption_emb"] = emb.float().numpy()
            if null is not None:
                row["null_emb"] = null
        return out

    def null_embedding(self) -> np.ndarray | None:
        """The unconditional caption of a preset whose sampling needs one (guided): its negative prompt's embedding
        [L, D], computed once per stage (None for the distilled presets, which have no unconditional branch)."""
        if not self.preset.sampling.null_caption:
            return None
        if self._null is None:
            text = self.preset.guidance.get("negative_prompt") or ""
            self._null = self.captioner.encode([text])[0].float().numpy()
        return self._null

    def _given_latent(self, row: dict) -> dict:
        """The tile plan of a given latent: the output it stands for (latent × the VAE factor × scale), or an explicit
        `out_size`; the latent padded (reflected) to the plan's canvas like an image, or, for an explicit size, left
        as it is for the diffuse stage to align with the network's rule."""
        lat = row["latent"]
        o = entered(row)
        size = row.get("out_size")
        plan = self._plan(row, o, given_latent_in_hw(self.preset, lat.shape[1:], size))
        check_output_side(target_size(plan.in_hw, plan.sr_scale, o.scale), o.max_output_side)
        if not size and tuple(lat.shape[1:]) != plan.lat_hw:
            ph, pw = plan.lat_hw[0] - lat.shape[1], plan.lat_hw[1] - lat.shape[2]
            mode = "reflect" if ph < lat.shape[1] and pw < lat.shape[2] else "symmetric"
            lat = np.pad(lat, ((0, 0), (0, ph), (0, pw)), mode=mode)
        row["latent"] = np.ascontiguousarray(lat, dtype=np.float32)
        row["plan"] = plan
        row["in_hw"] = list(plan.in_hw)
        return row
