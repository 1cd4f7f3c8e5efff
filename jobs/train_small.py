"""Train pidray's bundled small PiD model: 4× super-resolution on scikit-image's bundled photos, on a CPU (or a GPU).

The second version (what is bundled), from the first (kept in pipeline/assets/previous/):

    python -m jobs.train_small --init pipeline/assets/previous/pidray_small_sr4x_v1.safetensors

Same network class and code path as the released checkpoints (preset `small`): conditioned on the LQ RGB image
through the LQ projection's image branch, x0 prediction, the bicubic LQ image concatenated to the pixel input and
added to the output (so training starts at bicubic), plus pidray's pixel conv head (`out_conv`), which sees across
patch borders. It is trained for the sampler's t values of `--sampler-steps` (1: the single step from t = 1; with
several, half of the batches at a later t are built from the model's own x0 estimate of the step before, as the
sampler feeds it). The loss is MSE plus `--seam-weight` × the squared error of the gradient across patch lines
(`seam_loss`), which is what a patch grid is. On a GPU machine (torch, scikit-image; no Ray):
`python -m jobs.train_small --device cuda --minutes 8 ...` stops and saves within the time guard.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.model.lq import ResBlock
from pipeline.model.network import PidNet
from pipeline.model.presets import get_preset
from pipeline.model.sampler import DISTILLED_T, TIMESCALE, t_schedule
from pipeline.quality import HOLDOUT, evaluate_net, load_photos, make_lq


def pyramid(photos: list[torch.Tensor], scales: tuple[float, ...], min_size: int) -> list[list[torch.Tensor]]:
    """Each photo at each scale (antialiased bicubic): smaller copies are sharper, more varied training content."""
    out = []
    for img in photos:
        levels = []
        for s in scales:
            h, w = round(img.shape[-2] * s), round(img.shape[-1] * s)
            if min(h, w) < min_size:
                continue
            lvl = img if s == 1 else F.interpolate(img[None], size=(h, w), mode="bicubic", antialias=True)[0]
            levels.append(lvl.clamp(-1, 1))
        out.append(levels)
    return out


def random_crops(photos: list[list[torch.Tensor]], n: int, size: int, rng: random.Random) -> torch.Tensor:
    """n random crops: a random photo, a random scale of it, flips, 90° turns and (colour photos) a channel order."""
    out = []
    for _ in range(n):
        levels = photos[rng.randrange(len(photos))]
        img = levels[rng.randrange(len(levels))]
        _, h, w = img.shape
        top, left = rng.randrange(h - size + 1), rng.randrange(w - size + 1)
        crop = img[:, top : top + size, left : left + size]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        crop = torch.rot90(crop, rng.randrange(4), dims=(-2, -1))
        if rng.random() < 0.5:
            crop = crop[torch.tensor(rng.sample(range(3), 3))]
        out.append(crop)
    return torch.stack(out)


def learning_rate(step: int, peak: float, warmup: int, steps: int, time_used: float = 0.0) -> float:
    """Linear warmup, then a cosine to 0 at `steps` or when the time guard's budget is used (`time_used`, a share
    of `--minutes`), whichever comes first: a run stopped by the guard still ends with its rate decayed."""
    if step < warmup:
        return peak * (step + 1) / warmup
    done = max((step - warmup) / max(1, steps - warmup), time_used)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def seam_loss(pred: torch.Tensor, target: torch.Tensor, p: int) -> torch.Tensor:
    """Mean squared error of the gradient across the network's patch lines (every p-th column and row): the
    patch grid is exactly an error there, so this weighs it apart from the plain pixel error."""
    d = pred - target
    gx = d[..., :, p::p] - d[..., :, p - 1 : -1 : p]  # across vertical patch lines
    gy = d[..., p::p, :] - d[..., p - 1 : -1 : p, :]
    return 0.5 * (gx.pow(2).mean() + gy.pow(2).mean())


def init_from(net: PidNet, path: str) -> list[str]:
    """Start from an earlier checkpoint: every tensor whose name and shape match; returns the names left at init."""
    from pipeline.model.loading import network_tensors, read_state_dict

    own = net.state_dict()
    src = network_tensors(read_state_dict(path)[0])
    take = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    net.load_state_dict(take, strict=False)
    return sorted(set(own) - set(take))


def init_weights(net: PidNet) -> None:
    torch.nn.init.zeros_(net.final_layer.linear.weight)  # the residual output starts at bicubic
    torch.nn.init.zeros_(net.final_layer.linear.bias)
    for gate in net.lq_proj.gate_modules:
        torch.nn.init.trunc_normal_(gate.content_proj.weight, std=0.01)
        torch.nn.init.constant_(gate.content_proj.bias, 2.0)
        gate.log_alpha.data.fill_(math.log(5.0))
    for m in net.modules():  # residual branches start as the identity (new ones stay so when starting from a file)
        if isinstance(m, ResBlock):
            torch.nn.init.zeros_(m.block[-1].weight)
            torch.nn.init.zeros_(m.block[-1].bias)
    if net.out_conv is not None:  # the conv head starts silent
        torch.nn.init.zeros_(net.out_conv.conv2.weight)
        torch.nn.init.zeros_(net.out_conv.conv2.bias)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128, help="HQ crop size (the preset's tile size)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--self-cond", type=float, default=0.5, help="share of batches built from the model's own x0")
    ap.add_argument(
        "--sampler-steps",
        type=int,
        default=1,
        help="train for this many sampler steps: its t values (1: the single step from t = 1)",
    )
    ap.add_argument("--out-conv", type=int, default=32, help="hidden channels of the pixel conv head (0: none)")
    ap.add_argument("--lq-res-blocks", type=int, default=8, help="ResBlocks of the LQ branch (at the patch grid)")
    ap.add_argument("--scales", default="1,0.8,0.63,0.5", help="photo scales to crop from")
    ap.add_argument("--seam-weight", type=float, default=1.0, help="weight of seam_loss beside the MSE")
    ap.add_argument("--init", help="start from this checkpoint (matching tensors; new ones at their init)")
    ap.add_argument("--minutes", type=float, help="time guard: stop and save after this many minutes")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, … (needs torch, scikit-image, pipeline/)")
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/pidray_small_sr4x.safetensors", help="output (not the bundled file)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    preset = get_preset("small")
    cfg = dataclasses.replace(preset.config, out_conv=args.out_conv, lq_num_res_blocks=args.lq_res_blocks)
    scales = tuple(float(s) for s in args.scales.split(","))
    photos = pyramid(load_photos(exclude=HOLDOUT, min_size=args.crop), scales, args.crop)
    print(f"training photos: {len(photos)} at scales {scales}; held out: {HOLDOUT}")
    dev = torch.device(args.device)
    net = PidNet(cfg)
    init_weights(net)
    if args.init:
        new = init_from(net, args.init)
        print(f"initialised from {args.init}; {len(new)} tensors new: {sorted({k.rsplit('.', 2)[0] for k in new})}")
    net.to(dev)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"parameters: {n_params / 1e6:.2f} M")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = min(200, args.steps // 10)

    def lr_at(step):
        used = (time.time() - t0) / (60 * args.minutes) if args.minutes else 0.0
        return learning_rate(step, args.lr, warmup, args.steps, used)

    ts = t_schedule(args.sampler_steps, DISTILLED_T)[:-1]
    y = torch.zeros(args.batch, cfg.txt_max_length, cfg.txt_embed_dim, device=dev)
    sigma = torch.zeros(args.batch, device=dev)
    hq_size = (args.crop, args.crop)
    log, t0, ema_loss = [], time.time(), None
    done = args.steps

    def record(at: int) -> None:  # held-out figures into the log (and the file's train_log)
        res = evaluate_net(net, size=128, seed=0, steps=args.sampler_steps)
        log.append({"step": at, "seconds": round(time.time() - t0), **res["mean"]})
        print("eval", json.dumps(log[-1]), flush=True)

    for step in range(args.steps):
        if args.minutes and time.time() - t0 > 60 * args.minutes:
            done = step
            print(f"time guard: stopping after {step} steps", flush=True)
            break
        hq = random_crops(photos, args.batch, args.crop, rng)
        lq_img = make_lq(hq).to(dev)
        hq = hq.to(dev)
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
                x0_in = net(xp, torch.full((args.batch,), tp * TIMESCALE, device=dev), y, lq_ng, sigma).clamp(-1, 1)
        xt = (1 - t) * x0_in + t * eps
        pred = net(xt, torch.full((args.batch,), t * TIMESCALE, device=dev), y, lq, sigma)
        loss = F.mse_loss(pred, hq)
        if args.seam_weight:
            loss = loss + args.seam_weight * seam_loss(pred, hq, cfg.patch_size)
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
        if (step + 1) % args.eval_every == 0:
            record(step + 1)
            net.train()
    if not log or log[-1]["step"] != done:  # the last step, or where the time guard stopped
        record(done)
    wall = time.time() - t0
    from pipeline.model.loading import save_safetensors

    save_safetensors(
        net.eval().cpu(), args.out, cfg,
        extra={"preset": "small", "steps": done, "sampler_steps": args.sampler_steps, "init": args.init or "",
               "scales": args.scales, "steps_planned": args.steps, "batch": args.batch, "crop": args.crop,
               "lr": args.lr, "seed": args.seed, "self_cond": args.self_cond, "seam_weight": args.seam_weight,
               "out_conv": args.out_conv, "lq_res_blocks": args.lq_res_blocks, "wall_seconds": round(wall),
               "params": n_params,
               "train_log": json.dumps(log), "torch": torch.__version__, "numpy": np.__version__},
    )  # fmt: skip
    print(f"saved {args.out} after {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
