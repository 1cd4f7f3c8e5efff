"""GenerateStage: prompts -> PixelDiT images (the `generate` workflow's model stage; GPU where there is one).

A row carries `prompt` and may override seed, size, steps, shift, cfg_scale and negative_prompt. The caption encoder
is the one PiD uses (Gemma-2-2B with its cache); the negative prompt is embedded once per distinct text. Images of
one size are sampled together (each from its own seed's noise, so batching never changes an image). The output row
is what the merge stage writes (`pixels`, a one-tile plan, a PNG source) and, for `--upscale`, what the upscale
graph's encode stage takes (`image`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from pipeline.imageio import Decoded, quantize
from pipeline.model.presets import Preset
from pipeline.runtime import ModelOptions, load_caption_encoder, load_net
from pipeline.stages.common import Cancellable
from pipeline.stages.latent import latent_source
from pipeline.t2i import GenerateOptions, check_prompt, generate, initial_noise, row_options
from pipeline.tiling import TilePlan


class GenerateStage(Cancellable):  # a batch whose callers are all gone stops at the next step
    def __init__(self, model: ModelOptions, preset: Preset, options: GenerateOptions | None = None,
                 emit: str = "pixels", batch: int = 4):  # fmt: skip
        """model, preset, options: resolved where the job or request entered (the workflow)."""
        self.model = model
        self.options = options or GenerateOptions()
        self.preset, self.net = load_net(self.model, preset)
        if not self.preset.generates_images or self.net.cfg.has_lq:
            raise ValueError(f"preset {self.preset.name!r} is not a text-to-image model (pidray generate takes "
                             "pixeldit-2k or a preset file with task 't2i')")  # fmt: skip
        self.captioner = load_caption_encoder(self.model, self.preset)
        self.device = next(self.net.parameters()).device
        self.emit, self.batch = emit, batch
        self._null: OrderedDict[str, torch.Tensor] = OrderedDict()  # the last few negative prompts' embeddings
        self.cancelled: dict[str, None] = {}

    NEGATIVES_KEPT = 4  # a job has one negative prompt; an endpoint's clients each may send their own

    def _negative(self, text: str) -> torch.Tensor:
        """The embedding of a negative prompt, computed once while it stays among the last few used (LRU)."""
        if text in self._null:
            self._null.move_to_end(text)
            return self._null[text]
        emb = self._null[text] = self.captioner.encode([text])
        while len(self._null) > self.NEGATIVES_KEPT:
            self._null.popitem(last=False)
        return emb

    def process(self, row: dict) -> dict:
        return self.process_batch([row])[0]

    def process_batch(self, rows: list[dict]) -> list[dict]:
        todo = []
        for row in rows:
            check_prompt(row.get("prompt"))
            todo.append(row_options(self.options, row).resolved(self.preset))
        out: list[dict | None] = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, o in enumerate(todo):
            groups.setdefault((o.size, o.steps, o.shift, o.cfg_scale), []).append(i)
        for (size, steps, shift, cfg), idx in groups.items():
            for start in range(0, len(idx), self.batch):
                part = idx[start : start + self.batch]
                y = self.captioner.encode([rows[i]["prompt"] for i in part])
                y_null = torch.cat([self._negative(todo[i].negative_prompt) for i in part]) if cfg != 1.0 else None
                noise = torch.cat([initial_noise(todo[i].seed, size) for i in part]).to(self.device)
                mine = [rows[i] for i in part]
                imgs = generate(self.net, y.to(self.device), None if y_null is None else y_null.to(self.device),
                                noise, steps=steps, shift=shift, cfg_scale=cfg,
                                should_stop=lambda: all(self._gone(r) for r in mine))  # fmt: skip
                for i, img in zip(part, imgs):
                    out[i] = self._row(rows[i], todo[i], quantize(img, 8))
        return out

    def _row(self, row: dict, o: GenerateOptions, rgb) -> dict:
        row = dict(row)
        h, w = o.size
        row.update(seed=o.seed, in_hw=[h, w])
        if self.emit in ("image", "both"):  # handed to the upscale graph's encode stage
            row["image"] = Decoded(rgb=rgb, alpha=None, mode="RGB", format="PNG", gray=False)
        if self.emit in ("pixels", "both"):  # "both": the endpoint picks per request (upscaled or not)
            row["pixels"] = rgb
            row["src"] = latent_source()
            row["plan"] = TilePlan((h, w), 1, 1, 1, (h, w), (h, w), (1, 1))
        return row
