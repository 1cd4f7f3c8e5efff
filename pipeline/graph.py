"""The stage graph: the stages of a workflow (`pipeline.workflow`), and what every driver runs them with.

- `StageGraph.run_local` (here): a plain Python loop, used by `pidray upscale --local` and the Python API; a row
  goes on to merge and write as soon as its own group of images is diffused (`batch_parts`);
- `jobs/pipeline.py`: Ray Data, one `map_batches` per stage (actor pools for stages that hold a model);
- `serve/`: Ray Serve, one deployment per model-holding stage; the others run inside the ingress.
Each `StageSpec` (`pipeline.spec`) names its class, constructor arguments (resolved objects), whether it holds a
model (so a driver runs it as an actor / replica), its resources, its rows per call and its memory need. `with_io`
adds the bulk job's read and write stages. A driver never names a stage: adding one to a workflow is all it takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pipeline.runtime import ModelOptions, pick_device, pick_dtype
from pipeline.spec import Footprint, StageSpec, hidden_gpu_env
from pipeline.stages import is_failed, run_stage
from pipeline.stages.common import UpscaleOptions
from pipeline.stages.encode import plan_for
from pipeline.workflow import DEFAULT_WORKFLOW, WORKFLOWS, Workflow, io_stages, resolve_workflow

__all__ = ["StageGraph", "StageSpec", "WORKFLOWS", "batch_parts", "hidden_gpu_env", "upscale_bytes"]


class StageGraph:
    """The stages of one resolved workflow. Give it the `Workflow` (resolved where the job or request entered), or
    the pieces to resolve one here: a workflow name (`pipeline.workflow.WORKFLOWS`), the model, the options and, by
    workflow, `latent_format` (decode), `gen` (generate, ldm), `upscale` (generate) and `ldm` (ldm)."""

    def __init__(self, model: ModelOptions | None = None, options: UpscaleOptions | None = None,
                 workflow: str | Workflow = DEFAULT_WORKFLOW, latent_format: str | None = None, gen=None,
                 upscale: ModelOptions | None = None, ldm: str | None = None):  # fmt: skip
        if not isinstance(workflow, Workflow):
            workflow = resolve_workflow(workflow, model, options, latent_format=latent_format, gen=gen,
                                        upscale=upscale, ldm=ldm)  # fmt: skip
        self.workflow = workflow
        self.model, self.options, self.preset = workflow.model, workflow.options, workflow.preset
        self.stages = workflow.stages()

    def actors(self, gpus: int, requested: dict[str, int] | None = None) -> dict[str, int]:
        """Actors per model stage on a cluster with `gpus` GPUs: as requested, else one per GPU (one if none)."""
        requested = requested or {}
        return {s.name: requested.get(s.name) or (max(1, gpus) if s.wants_gpu and gpus else 1)
                for s in self.model_stages()}  # fmt: skip

    def gpus_needed(self, actors: dict[str, int]) -> float:
        return sum(s.gpu_share * actors.get(s.name, 0) for s in self.model_stages() if s.wants_gpu)

    def with_io(self, src, dst) -> StageGraph:
        """This graph with the bulk job's read (from `src`) and write (to `dst`) stages at its ends."""
        g = object.__new__(StageGraph)
        g.__dict__.update(self.__dict__)
        read, write = io_stages(src, dst)
        g.stages = [*read, *self.stages, write]
        return g

    def __getitem__(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def model_stages(self) -> list[StageSpec]:
        return [s for s in self.stages if s.holds_model]

    def memory_estimate(self, in_hw: tuple[int, int], device: str | None = None) -> dict[str, int]:
        """Bytes per stage for one image of in_hw pixels (the diffuse stage at batch size 1), as each stage's spec
        says (stages with no memory need of note are left out)."""
        device_t = pick_device(device or self.model.device)
        dtype = pick_dtype(self.model.dtype, device_t)
        plan = plan_for(self.preset, self.options, in_hw)
        fp = Footprint(self.preset, self.options, plan, tuple(in_hw), device_t, dtype)
        return {s.name: s.memory(fp) for s in self.stages if s.memory is not None}

    def build_all(self) -> list:
        return [s.build() for s in self.stages]

    def run_local(self, rows: Iterable[dict], stages: list | None = None, batch: int = 8) -> Iterator[dict]:
        """Run rows through every stage in this process (stages built once), `batch` rows at a time so that
        the model stages batch across images. A row goes on through the later stages, and comes out, as soon as
        its own part of a stage's batch is done (`batch_parts`): the diffuse stage runs a chunk as groups of images
        that share network calls, and each group is merged and written before the next one diffuses. Rows come out
        in the order they finish: a part's rows in input order, a row that failed earlier with the row before it."""
        stages = stages or self.build_all()
        pairs = list(zip(self.stages, stages))
        it = (self.workflow.enter(r) for r in rows)  # where rows enter: options resolved once
        while chunk := [r for _, r in zip(range(batch), it)]:
            yield from _flow(pairs, chunk)


def batch_parts(stage, rows: list[dict]) -> list[list[int]]:
    """The parts to run `rows` through `stage` in, as index lists, each a batch whose rows may go on as soon as it is
    done: the stage's own parts (`stage.batch_parts`: rows that share its calls), or all the rows as one part. A row
    that failed earlier (every stage passes it untouched) goes with the part of the row before it, so rows keep their
    input order wherever the parts allow."""
    split = getattr(stage, "batch_parts", None)
    live = [i for i, r in enumerate(rows) if not is_failed(r)]
    if split is None or len(live) < 2:
        return [list(range(len(rows)))]
    try:
        parts = [[live[j] for j in part] for part in split([rows[i] for i in live])]
    except Exception:  # never costs a row: the batch runs as one (the envelope isolates a bad row)
        return [list(range(len(rows)))]
    if sorted(i for part in parts for i in part) != live or not all(parts):
        return [list(range(len(rows)))]
    where = {i: k for k, part in enumerate(parts) for i in part}
    k = 0
    for i in range(len(rows)):
        if i in where:
            k = where[i]
        else:
            parts[k].append(i)
    return [sorted(part) for part in parts]


def _flow(pairs: list, rows: list[dict]) -> Iterator[dict]:
    """`rows` through the stages `pairs` ((spec, stage), in order); where a stage runs them in several parts, each
    part goes on through the later stages before the next part runs. Yields the rows that leave the last stage."""
    for k, (spec, stage) in enumerate(pairs):
        parts = batch_parts(stage, rows)
        if len(parts) == 1:
            rows = run_stage(stage, spec.name, rows)
            continue
        for part in parts:
            yield from _flow(pairs[k + 1 :], run_stage(stage, spec.name, [rows[i] for i in part]))
        return
    yield from rows


def upscale_bytes(data: bytes, model: ModelOptions | None = None, options: UpscaleOptions | None = None, **row):
    """Python API: one image file's bytes in, the upscaled file's row out (`output`, `out_hw`, or `error`)."""
    graph = StageGraph(model, options)
    return next(graph.run_local([{"key": row.pop("key", "image"), "bytes": data, **row}]))
