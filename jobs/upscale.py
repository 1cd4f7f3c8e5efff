"""`pidray upscale`: placeholder until the stage graph lands."""

from __future__ import annotations


def add_upscale_parser(sub) -> None:
    p = sub.add_parser("upscale", help="upscale a file, folder or s3:// prefix (not yet)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--local", action="store_true")
    p.set_defaults(fn=lambda args: print("pidray upscale: not yet") or 0)
