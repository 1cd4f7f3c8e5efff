"""Where a preset's weights come from: the bundled file, a local directory laid out like the hub repo,
or (only when the user allows it) a download from the `nvidia/PiD` hub repository.

The released PiD weights are under NVIDIA's non-commercial licence (see the model card of
`nvidia/PiD`); pidray does not ship them and never downloads them unless asked to.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.model.presets import BUNDLED_DIR, HUB_REPO, Preset, WeightFile

LICENCE_NOTE = (
    "The PiD weights are released by NVIDIA under a non-commercial licence (https://huggingface.co/nvidia/PiD); "
    "by downloading them you accept its terms."
)
ENV_ROOT = "PIDRAY_WEIGHTS"  # a directory laid out like the hub repo
ENV_ALLOW_DOWNLOAD = "PIDRAY_ALLOW_DOWNLOAD"


class WeightsNotFound(FileNotFoundError):
    pass


def _wanted(preset: Preset) -> dict[str, WeightFile]:
    """role -> what to find: the network checkpoint, then the preset's encoder files."""
    return {"net": WeightFile("net", preset.checkpoint), **{f.role: f for f in preset.weight_files()}}


def _path(root: Path | None, f: WeightFile) -> Path | None:
    """Where `f` is: an absolute path as it is (a preset file may name its checkpoint), else under the root."""
    if Path(f.local).is_absolute():
        return Path(f.local)
    return root / f.local if root is not None else None


def _present(root: Path | None, f: WeightFile) -> bool:
    path = _path(root, f)
    if path is None:
        return False
    return all((path / name).is_file() for name in f.files) if f.files else path.is_file()


def _fetch(f: WeightFile, root: Path | None) -> Path:
    from huggingface_hub import hf_hub_download

    if f.files:  # a model folder: its files, side by side, in `local`
        target = (root or Path.cwd()) / f.local
        for name in f.files:
            hf_hub_download(f.repo, name, local_dir=target)
        return target
    remote = f.remote or f.local
    got = Path(hf_hub_download(f.repo, remote, local_dir=root))
    if root is not None and remote != f.local:  # kept at the path the preset reads (the official layout)
        (root / f.local).parent.mkdir(parents=True, exist_ok=True)
        got.replace(root / f.local)
        return root / f.local
    return got


def download_command(f: WeightFile) -> str:
    """The shell command that puts `f` under DIR, the weights directory."""
    if f.files:
        return f"hf download {f.repo} {' '.join(f.files)} --local-dir DIR/{f.local}"
    if f.remote and f.remote != f.local:
        parent = f.local.rsplit("/", 1)[0]
        return (
            f"hf download {f.repo} {f.remote} --local-dir DIR/_dl && mkdir -p DIR/{parent} && "
            f"mv DIR/_dl/{f.remote} DIR/{f.local}"
        )
    return f'hf download {f.repo} --local-dir DIR --include "{f.local}"'


def resolve(
    preset: Preset, root: str | Path | None = None, *, allow_download: bool | None = None, only: tuple = ()
) -> dict[str, Path]:
    """Local paths of everything the preset loads: {"net": ..., and per encoder file its role ("vae", "encoder",
    "stats")}. Missing files are downloaded only when allowed; otherwise one error lists every missing file with
    the command that gets it and the licence it comes under."""
    if preset.bundled:
        path = BUNDLED_DIR / preset.checkpoint
        if not path.is_file():
            raise WeightsNotFound(f"bundled weights missing from the package: {path} (reinstall pidray)")
        return {"net": path}
    root = root or os.environ.get(ENV_ROOT)
    root = Path(root).expanduser().resolve() if root else None
    if allow_download is None:
        allow_download = os.environ.get(ENV_ALLOW_DOWNLOAD, "") in ("1", "true", "yes")
    wanted = {r: f for r, f in _wanted(preset).items() if not only or r in only}  # only: the roles a use needs
    found = {role: _path(root, f) for role, f in wanted.items() if _present(root, f)}
    missing = [f for role, f in wanted.items() if role not in found]
    if not missing:
        return found
    if allow_download:
        for f in missing:
            found[f.role] = _fetch(f, root)
        return found
    where = f"under {root}" if root else f"(no weights directory given: pass --weights DIR or set {ENV_ROOT})"
    ours = [f.local for f in missing if f.repo == HUB_REPO and not f.files]
    cmds = [f"hf download {HUB_REPO} --local-dir DIR --include " + " ".join(f'"{m}"' for m in ours)] if ours else []
    cmds += [download_command(f) for f in missing if f.repo != HUB_REPO or f.files]
    licences = sorted({f"{f.repo}: {f.licence}" for f in missing if f.repo != HUB_REPO})
    raise WeightsNotFound(
        f"preset {preset.name!r} needs {len(missing)} file(s) not found {where}: "
        + ", ".join(f.local + (f"/{{{','.join(f.files)}}}" if f.files else "") for f in missing)
        + ". Get them with: "
        + " ; ".join(cmds)
        + f" — then pass --weights DIR; or allow pidray to download them (--allow-download or "
        f"{ENV_ALLOW_DOWNLOAD}=1). "
        + (LICENCE_NOTE if ours else "")
        + (" Licences: " + "; ".join(licences) + "." if licences else "")
    )
