"""Train pidray's bundled small PiD model: 4× super-resolution on scikit-image's bundled photos, on a CPU.

    python -m jobs.train_small --steps 6000 --out pipeline/assets/pidray_small_sr4x.safetensors

Same network class and code path as the released checkpoints (preset `small`): conditioned on the
LQ RGB image through the LQ projection's image branch, x0 prediction, the bicubic LQ image
concatenated to the pixel input and added to the output (so training starts at bicubic). It is
trained on the distilled sampler's own four t values. Half of the batches at a later t are
built from the model's own x0 estimate of the step before (no gradient), which is what the
4-step sampler feeds it at inference time.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.model.network import PidNet
from pipeline.model.presets import get_preset
from pipeline.model.sampler import DISTILLED_T, TIMESCALE
from pipeline.quality import HOLDOUT, load_photos, make_lq


def random_crops(photos: list[torch.Tensor], n: int, size: int, rng: random.Random) -> torch.Tensor:
    out = []
    for _ in range(n):
        img = photos[rng.randrange(len(photos))]
        _, h, w = img.shape
        top, left = rng.randrange(h - size + 1), rng.randrange(w - size + 1)
        crop = img[:, top : top + size, left : left + size]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        crop = torch.rot90(crop, rng.randrange(4), dims=(-2, -1))
        out.append(crop)
    return torch.stack(out)


def init_weights(net: PidNet) -> None:
    torch.nn.init.zeros_(net.final_layer.linear.weight)  # the residual output starts at bicubic
    torch.nn.init.zeros_(net.final_layer.linear.bias)
    for gate in net.lq_proj.gate_modules:
        torch.nn.init.trunc_normal_(gate.content_proj.weight, std=0.01)
        torch.nn.init.constant_(gate.content_proj.bias, 2.0)
        gate.log_alpha.data.fill_(math.log(5.0))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128, help="HQ crop size (the preset's tile size)")
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--self-cond", type=float, default=0.5, help="share of batches built from the model's own x0")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="pipeline/assets/pidray_small_sr4x.safetensors")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    preset = get_preset("small")
    cfg = preset.config
    photos = load_photos(exclude=HOLDOUT, min_size=args.crop)
    print(f"training photos: {len(photos)}; held out: {HOLDOUT}")
    net = PidNet(cfg)
    init_weights(net)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"parameters: {n_params / 1e6:.2f} M")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = min(200, args.steps // 10)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    ts = DISTILLED_T[:-1]
    y = torch.zeros(args.batch, cfg.txt_max_length, cfg.txt_embed_dim)
    sigma = torch.zeros(args.batch)
    hq_size = (args.crop, args.crop)
    log, t0, ema_loss = [], time.time(), None
    for step in range(args.steps):
        hq = random_crops(photos, args.batch, args.crop, rng)
        lq_img = make_lq(hq)
        k = rng.randrange(len(ts))
        t = ts[k]
        eps = torch.randn_like(hq)
        lq = net.encode_lq(hq_size, image=lq_img)
        x0_in = hq
        if k > 0 and rng.random() < args.self_cond:
            with torch.no_grad():  # the estimate the sampler would hold at step k
                tp = ts[k - 1]
                xp = (1 - tp) * hq + tp * torch.randn_like(hq)
                lq_ng = net.encode_lq(hq_size, image=lq_img)
                x0_in = net(xp, torch.full((args.batch,), tp * TIMESCALE), y, lq_ng, sigma).clamp(-1, 1)
        xt = (1 - t) * x0_in + t * eps
        pred = net(xt, torch.full((args.batch,), t * TIMESCALE), y, lq, sigma)
        loss = F.mse_loss(pred, hq)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            print(
                f"step {step + 1}/{args.steps} loss {ema_loss:.5f} lr {lr_at(step):.2e} {time.time() - t0:.0f}s",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            from pipeline.quality import evaluate_net

            res = evaluate_net(net, size=128, seed=0)
            log.append({"step": step + 1, "seconds": round(time.time() - t0), **res["mean"]})
            print("eval", json.dumps(log[-1]), flush=True)
            net.train()
    wall = time.time() - t0
    from pipeline.model.loading import save_safetensors

    save_safetensors(
        net.eval(), args.out, cfg,
        extra={"preset": "small", "steps": args.steps, "batch": args.batch, "crop": args.crop, "lr": args.lr,
               "seed": args.seed, "self_cond": args.self_cond, "wall_seconds": round(wall), "params": n_params,
               "train_log": json.dumps(log), "torch": torch.__version__, "numpy": np.__version__},
    )  # fmt: skip
    print(f"saved {args.out} after {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
