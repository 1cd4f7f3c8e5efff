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
    where = f"under {root}" if root else f"(no weights folder: pass --weights DIR or set {ENV_ROOT})"
    ours = [f.local for f in missing if f.repo == HUB_REPO and not f.files]
    cmds = [f"hf download {HUB_REPO} --local-dir DIR --include " + " ".join(f'"{m}"' for m in ours)] if ours else []
    cmds += [download_command(f) for f in missing if f.repo != HUB_REPO or f.files]
    licences = sorted({f"{f.repo}: {f.licence}" for f in missing if f.repo != HUB_REPO})
    files = ", ".join(f.local + (f"/{{{','.join(f.files)}}}" if f.files else "") for f in missing)
    raise WeightsNotFound(
        f"preset {preset.name!r}: {len(missing)} weight file(s) not found {where}\n"  # the first line says it all
        f"  missing: {files}\n"
        "  get them (then pass --weights DIR):\n"
        + "".join(f"    {c}\n" for c in cmds)
        + f"  or let pidray download them: --allow-download (or {ENV_ALLOW_DOWNLOAD}=1)"
        + (f"\n  {LICENCE_NOTE}" if ours else "")
        + ("\n  licences: " + "; ".join(licences) if licences else "")
    )


def caption_encoder_missing(preset_name: str) -> str:
    """What a preset that needs the caption encoder says when none was given: a line, then how to get it."""
    return (
        f"preset {preset_name!r} needs the Gemma-2-2B-it caption encoder\n"
        "  get it (Gemma's own terms apply), then pass --text-encoder DIR:\n"
        "    hf download Efficient-Large-Model/gemma-2-2b-it --local-dir DIR\n"
        "  or let pidray download it: --allow-download"
    )


def missing_message(missing: list[str]) -> str:
    """Several missing things as one message: a first line that counts them, then each one's first line numbered
    and its details (the download commands) indented below it."""
    if len(missing) == 1:
        return missing[0]
    lines = [f"{len(missing)} things are missing:"]
    for i, m in enumerate(missing, 1):
        first, *rest = m.splitlines()
        lines += [f"  ({i}) {first}", *(f"  {r}" for r in rest)]
    return "\n".join(lines)
