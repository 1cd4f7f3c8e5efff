"""Where a preset's weights come from: the bundled file, a local directory laid out like the hub repo,
or (only when the user allows it) a download from the `nvidia/PiD` hub repository.

The released PiD weights are under NVIDIA's non-commercial licence (see the model card of
`nvidia/PiD`); pidray does not ship them and never downloads them unless asked to.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.model.presets import BUNDLED_DIR, HUB_REPO, Preset

LICENCE_NOTE = (
    "The PiD weights are released by NVIDIA under a non-commercial licence (https://huggingface.co/nvidia/PiD); "
    "by downloading them you accept its terms."
)
ENV_ROOT = "PIDRAY_WEIGHTS"  # a directory laid out like the hub repo
ENV_ALLOW_DOWNLOAD = "PIDRAY_ALLOW_DOWNLOAD"


class WeightsNotFound(FileNotFoundError):
    pass


def _files(preset: Preset) -> list[str]:
    files = [preset.checkpoint]
    if preset.vae_checkpoint:
        files.append(preset.vae_checkpoint)
    return files


def resolve(preset: Preset, root: str | Path | None = None, *, allow_download: bool | None = None) -> dict[str, Path]:
    """Local paths of the preset's network (and VAE) weights: {"net": ..., "vae": ...}."""
    if preset.bundled:
        path = BUNDLED_DIR / preset.checkpoint
        if not path.is_file():
            raise WeightsNotFound(f"bundled weights missing from the package: {path} (reinstall pidray)")
        return {"net": path}
    root = root or os.environ.get(ENV_ROOT)
    root = Path(root).expanduser().resolve() if root else None
    if allow_download is None:
        allow_download = os.environ.get(ENV_ALLOW_DOWNLOAD, "") in ("1", "true", "yes")
    wanted = dict(zip(("net", "vae"), _files(preset)))
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role, rel in wanted.items():
        if root is not None and (root / rel).exists():
            found[role] = root / rel
        else:
            missing.append(rel)
    if not missing:
        return found
    if allow_download:
        from huggingface_hub import hf_hub_download, snapshot_download

        for role, rel in wanted.items():
            if role in found:
                continue
            if rel.endswith((".pth", ".safetensors")):
                found[role] = Path(hf_hub_download(HUB_REPO, rel, local_dir=root))
            else:  # a folder (RAE encoders)
                base = snapshot_download(HUB_REPO, allow_patterns=[rel + "/*"], local_dir=root)
                found[role] = Path(base) / rel
        return found
    where = f"under {root}" if root else f"(no weights directory given: pass --weights DIR or set {ENV_ROOT})"
    raise WeightsNotFound(
        f"preset {preset.name!r} needs {len(missing)} file(s) not found {where}: {', '.join(missing)}. "
        f"Get them with: hf download {HUB_REPO} --local-dir DIR --include "
        + " ".join(f'"{m}"' for m in missing)
        + f" — then pass --weights DIR; or allow pidray to download them (--allow-download or "
        f"{ENV_ALLOW_DOWNLOAD}=1). {LICENCE_NOTE}"
    )
