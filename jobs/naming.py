"""Which extension an input's output takes, so that inputs whose outputs cannot collide keep their plain names.

With formats kept, `x.png` and `x.jpg` become `x.png` and `x.jpg`: their outputs differ by extension. Names on one
stem keep their source extension in the output's name (`a.png.png`, `a.gif.png`) only when their outputs would share
one (a GIF and a BMP are written as PNG), or when `-f` gives them all one format.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from pipeline.imageio import EXTENSIONS, FORMATS


def natural_extension(name: str, fmt: str | None) -> str:
    """The output extension of an input named `name`: -f's, else the one its own format keeps (JPEG stays .jpg,
    TIFF .tif, WebP .webp); PNG for a GIF, a BMP or anything else. A file whose content belies its extension may
    still come out otherwise: the plan never relies on this for safety, only for names."""
    if fmt:
        return EXTENSIONS[FORMATS[fmt.lower().lstrip(".")]]
    kind = FORMATS.get(PurePosixPath(name).suffix.lower().lstrip("."))
    return ".png" if kind in (None, "BMP") else EXTENSIONS[kind]


def sibling_extensions(names: dict[str, str], stems: dict[str, str], fmt: str | None) -> dict[str, list[str]]:
    """id -> the natural output extensions of the other inputs named on the same output stem: outputs that are
    theirs, never this input's (a rerun finds `x.jpg` as x.jpg's output, not x.png's)."""
    by_stem: dict[str, set[tuple[str, str]]] = {}
    for i, stem in stems.items():
        by_stem.setdefault(stem.casefold(), set()).add((i, natural_extension(names[i], fmt)))
    return {i: sorted({e for j, e in by_stem[stem.casefold()] if j != i}) for i, stem in stems.items()}
