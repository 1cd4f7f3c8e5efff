"""Experiment (issue 16): a plain EDSR-style CNN trained on the small model's data, as a reference for its ceiling.

    python -m jobs.cnn_reference --channels 64 --blocks 8 --minutes 12

Conv stack at the LQ resolution (no normalisation), pixel shuffle ×4 added to bicubic, L1 loss, Adam with a cosine
over the time budget; the same training photos, scales, crops and augmentation as `jobs.train_small`, and the same
held-out figure as `pidray eval-small` (PSNR-Y gain over bicubic on the 256² centre crops of HOLDOUT).
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from jobs.train_small import pyramid, random_crops
from pipeline.quality import HOLDOUT, bicubic_up, center_crop, load_photo, load_photos, make_lq, psnr_y


class CNN(nn.Module):
    def __init__(self, channels: int, blocks: int):
        super().__init__()
        kw = dict(kernel_size=3, padding=1, padding_mode="replicate")
        self.conv_in = nn.Conv2d(3, channels, **kw)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, **kw), nn.ReLU(), nn.Conv2d(channels, channels, **kw))
            for _ in range(blocks)
        )
        self.conv_out = nn.Conv2d(channels, 48, **kw)
        for b in self.blocks:
            b[-1].weight.data.mul_(0.1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        h0 = h = self.conv_in(lq)
        for b in self.blocks:
            h = h + b(h)
        bic = F.interpolate(lq, scale_factor=4, mode="bicubic", align_corners=False)
        return bic + F.pixel_shuffle(self.conv_out(h + h0), 4)


def heldout_gain(net: CNN) -> float:
    gains = []
    with torch.no_grad():
        for name in HOLDOUT:
            hq = center_crop(load_photo(name), 256)
            lq = make_lq(hq[None])
            gains.append(psnr_y(net(lq)[0].clamp(-1, 1), hq) - psnr_y(bicubic_up(lq)[0], hq))
    return sum(gains) / len(gains)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    net = CNN(args.channels, args.blocks)
    opt = torch.optim.Adam(net.parameters(), args.lr)
    photos = pyramid(load_photos(exclude=HOLDOUT, min_size=args.crop), (1, 0.8, 0.63, 0.5), args.crop)
    t0, step, budget = time.time(), 0, 60 * args.minutes
    while time.time() - t0 < budget:
        hq = random_crops(photos, args.batch, args.crop, rng)
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (time.time() - t0) / budget)))
        loss = F.l1_loss(net(make_lq(hq)), hq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 500 == 0:
            print(f"step {step} {time.time() - t0:.0f}s held-out gain {heldout_gain(net.eval()):+.2f} dB", flush=True)
            net.train()
    n = sum(p.numel() for p in net.parameters())
    print(f"final: {step} steps, {n} parameters, held-out gain {heldout_gain(net.eval()):+.2f} dB over bicubic")


if __name__ == "__main__":
    main()
