"""The workflows make the pixels they made before a refactoring: each case of `tests/make_same_outputs.py` (the
bundled model over the sample images; a latent decoded by stand-ins of a distilled and a guided preset; a prompt
through a PixelDiT stand-in, upscaled), run here by the bulk job in-process on the CPU, against the references in
`tests/data/same_outputs` (their commit is in `references.json`; `python tests/make_same_outputs.py CHECKOUT`
makes them from any checkout).

Tolerance, per output: every uint8 value within MAX_ABS_DIFF = 3 of the reference, and at least MIN_IDENTICAL = 98%
of them equal. float32 rounds differently from one CPU to another (AVX2 and AVX-512 kernels sum in other orders), so
equality cannot be asked of another machine. Measured on the references' machine, with every linear and conv
output of the networks perturbed by a relative N(0, eps) as a stand-in for that round-off: eps 1e-6 and 1e-5
(about 10 and 100 float32 ulps per layer) gave at most 2 levels and >= 99.48% equal values (the PixelDiT stand-in,
whose random network amplifies most), eps 1e-4 at most 2 levels and >= 95.6%. Real changes are far outside: the
smallest measured, the small model's tile 128 -> 256 (within 46.5 dB of each other), leaves 68-80% of values
equal and differs by up to 17 levels; a seed, the fusion, a tile overlap or a flow shift changed leave 19-77% equal,
with differences of up to 5 to 255 levels.

On the references' own machine a run is expected to be byte-identical (the same sha256 of the pixels); the test
prints which it is for each output.
"""

import json

import numpy as np
import pytest
from make_same_outputs import CASES, REFERENCES, one_thread, run_case, sha256
from PIL import Image

MAX_ABS_DIFF = 3
MIN_IDENTICAL = 0.98


def _listing() -> dict:
    return json.loads((REFERENCES / "references.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_are_those_of_the_references(case, tmp_path):
    listing = _listing()
    refs = listing["cases"][case]
    with one_thread():
        outputs = run_case(case, tmp_path)
    assert sorted(outputs) == sorted(refs)
    for key, pixels in outputs.items():
        ref = np.asarray(Image.open(REFERENCES / case / f"{key}.png").convert("RGB"))
        assert sha256(ref) == refs[key]["sha256"], f"{case}/{key}.png is not the image references.json lists"
        assert pixels.shape == ref.shape
        diff = np.abs(pixels.astype(np.int16) - ref.astype(np.int16))
        equal = float((diff == 0).mean())
        same = sha256(pixels) == refs[key]["sha256"]
        print(f"{case}/{key}: " + ("byte-identical" if same else f"max diff {diff.max()}, {equal:.3%} equal")
              + f" to the references of {listing['commit'][:10]}")  # fmt: skip
        assert diff.max() <= MAX_ABS_DIFF and equal >= MIN_IDENTICAL, (
            f"{case}/{key}: max diff {diff.max()} (at most {MAX_ABS_DIFF}), {equal:.3%} of values equal "
            f"(at least {MIN_IDENTICAL:.0%})"
        )


def test_the_references_are_listed_and_small():
    """Every case has its references, every file is listed, and together they stay small enough to commit."""
    listing = _listing()
    assert sorted(listing["cases"]) == sorted(CASES)
    files = {p.relative_to(REFERENCES).as_posix() for p in REFERENCES.rglob("*.png")}
    assert files == {f"{c}/{k}.png" for c, outs in listing["cases"].items() for k in outs}
    assert sum(p.stat().st_size for p in REFERENCES.rglob("*")) < 1_000_000
