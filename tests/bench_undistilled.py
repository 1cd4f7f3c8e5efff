"""Median diffuse-stage seconds per image, the distilled flux-2kto4k-v1.5 stand-in vs its undistilled twin, in
interleaved runs: `python tests/bench_undistilled.py HxW RUNS` (a benchmark, not a test; the first run is warm-up).
Needs ../shared/golden (the stand-ins take the golden fixture's small sizes)."""

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from test_encoders import build_stand_in  # noqa: E402
from test_undistilled import _photo  # noqa: E402

from pipeline.graph import StageGraph  # noqa: E402
from pipeline.model.presets import PRESETS  # noqa: E402
from pipeline.runtime import ModelOptions  # noqa: E402
from pipeline.stages import UpscaleOptions  # noqa: E402

torch.set_num_threads(2)
hw = tuple(int(v) for v in sys.argv[1].split("x"))
graphs, times = {}, {}
for name in ("flux-2kto4k-v1.5", "flux-2kto4k-v1.5-undistilled"):
    root = Path(tempfile.mkdtemp())
    p = build_stand_in(name, Path(__file__).resolve().parents[2] / "shared" / "golden", root)
    PRESETS[p.name] = p
    graphs[name] = StageGraph(ModelOptions(p.name, weights=str(root)), UpscaleOptions(overlap=1, seed=1))
    times[name] = []
data = _photo(hw)
for i in range(int(sys.argv[2])):
    for name, g in graphs.items():
        r = next(g.run_local([{"key": f"a{i}", "bytes": data}]))
        assert r["status"] == "ok"
        if i:
            times[name].append(r["timings"]["diffuse"])
    grid = r["plan"]["grid"]
med = {n: statistics.median(t) for n, t in times.items()}
for n, m in med.items():
    print(f"{n}: diffuse median {m:.3f} s/image ({hw[0]}x{hw[1]} -> x4, tiles {grid})")
print(f"ratio undistilled/distilled: {med['flux-2kto4k-v1.5-undistilled'] / med['flux-2kto4k-v1.5']:.2f}")
