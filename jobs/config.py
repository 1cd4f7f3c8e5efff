"""What a bulk job is asked to do (`JobConfig`) and what it did (`Summary`, counters)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, replace

from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions
from pipeline.storage import S3Settings
from pipeline.workflow import DEFAULT_WORKFLOW, Workflow, resolve_workflow, workflow_class


@dataclass(frozen=True)
class JobConfig:
    """What a bulk job is asked to do: frozen, with its workflow (`flow`) resolved once, as the config is built.

    Building one looks the preset up (the only place a job does) and types the generator's settings: a preset,
    workflow or setting that cannot be resolved raises there (ValueError, BadParameter). A copy (`with_`,
    `dataclasses.replace`) keeps the original's `flow`: the same object while the options are the same, else one
    with the copy's options and the same Preset object; a copy with another model, workflow, latent format,
    generator setting or upscale model resolves its own. `flow` is carried over from the config a copy is made of:
    leave it out when building one."""

    src: str
    dst: str
    model: ModelOptions = field(default_factory=ModelOptions)
    options: UpscaleOptions = field(default_factory=UpscaleOptions)
    s3: S3Settings = field(default_factory=S3Settings)
    suffix: str = ""
    in_place: bool = False  # DST is SRC: outputs beside the inputs (needs a suffix; inputs are never overwritten)
    follow_symlinks: bool = False  # follow symbolic links inside SRC (noted in the manifest)
    include_hidden: bool = False  # process files whose path has a segment starting with '.'
    captions: dict[str, str] = field(default_factory=dict)  # key -> caption (from a manifest CSV/JSONL)
    resume: bool | str = False  # True, or "redo-changed" (jobs/settings.py)
    overwrite: bool = False  # replace outputs already in DST -- only those DST's manifest records as pidray's own
    dry_run: bool = False
    local: bool | None = None  # True: the in-process loop; False: Ray Data; None: the loop for small jobs, no cluster
    verbose: bool = False  # let Ray's own start-up and worker messages through to the terminal
    concurrency: dict[str, int] = field(default_factory=dict)  # stage name -> actors (model stages)
    progress: bool = True
    workflow: str = DEFAULT_WORKFLOW  # a name in pipeline.workflow.WORKFLOWS, e.g. "decode": SRC holds latents
    latent_format: str | None = None  # decode: what the latents are (flux, zimage, sd3, sdxl, flux2, qwenimage)
    out_size: tuple[int, int] | None = None  # decode: an explicit output size (H, W) instead of latent × factors
    sigma: float | None = None  # decode: the latents are captured x_t at this scheduler sigma
    gen: dict = field(default_factory=dict)  # generate: GenerateOptions fields (SRC is a prompt file)
    upscale: ModelOptions | None = None  # generate: upscale each image with this PiD model
    ldm: str | None = None  # generate-then-decode: the latent diffusion model (name or folder); `model` decodes
    generator_offload: bool = False  # generate-then-decode: the generator's models offloaded to CPU between uses
    limit: int | None = None  # only the first N planned inputs (None: all)
    output_name: str = ""  # SRC is one file, DST named a file: the output's name in DST without its extension
    manifest: str = ""  # a file job's manifest goes here (a local path); "" for one: none (only the file is written)
    flow: Workflow = field(default=None, kw_only=True, compare=False, repr=False)  # the job's workflow, resolved

    def __post_init__(self) -> None:
        object.__setattr__(self, "flow", self._resolved(self.flow))

    def latent_fields(self) -> dict:
        """What a decode job gives every latent it reads: the output size and sigma asked for (those asked only)."""
        return {k: v for k, v in (("out_size", self.out_size), ("sigma", self.sigma)) if v is not None}

    def with_(self, **changes) -> JobConfig:
        """A copy with `changes` (as `dataclasses.replace`): the workflow resolved once is kept, its options
        following the copy's; a change to what it was resolved from resolves the copy's own."""
        return replace(self, **changes)

    def _resolved(self, before: Workflow | None) -> Workflow:
        """The workflow of these fields: `before` (the flow of the config this one is a copy of) when it was
        resolved from the same ones, its presets reused where only its options or settings differ; else resolved,
        the preset looked up."""
        kw = {"latent_format": self.latent_format, "gen": self.gen, "ldm": self.ldm, "offload": self.generator_offload}
        name, model, options = self.workflow, self.model, self.options
        if (before is None or type(before) is not workflow_class(name) or before.model != model
                or getattr(before, "upscale", self.upscale) != self.upscale):  # fmt: skip
            return resolve_workflow(name, model, options, upscale=self.upscale, **kw)
        again = resolve_workflow(name, model, options, upscale=self.upscale, preset=before.preset,
                                 upscale_preset=getattr(before, "upscale_preset", None), **kw)  # fmt: skip
        return before if again == before else again


KEEP_ROWS = 10_000  # a job's rows kept in its Summary (for the terminal and the Python API); beyond, only counted
KEEP_FAILED = 200  # failed rows kept for the terminal, whatever the job's size


@dataclass
class Summary:
    """A job's outcome, from counters: `rows` holds its first KEEP_ROWS manifest rows (all of a small job's), and
    `failures` its first KEEP_FAILED failed ones; the manifest at DST has every row."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)
    interrupted: int = 0  # the signal that stopped the job, or 0
    runner: str = ""  # "local loop" or "Ray Data"
    manifest: str = ""  # where the manifest was written
    planned: int = 0  # dry run: inputs to do
    failures: list[dict] = field(default_factory=list)
    kept_all: bool = True  # False once `rows` stopped keeping
    failures_shown: bool = False  # each failed input was said on the terminal as it happened
    already: int = 0  # of `skipped`: inputs an earlier run did (kept by --resume; `ok` in the manifest)

    def count(self, row: dict, already: bool = False) -> None:
        """One manifest row of the job, counted (and kept while the job is small). already: an input an earlier run
        did (its row says `ok`; this run skipped it)."""
        status = "skipped" if already else row.get("status")
        self.already += already
        if status in ("ok", "failed", "skipped", "planned"):  # `interrupted` is told by the summary's signal
            setattr(self, status, getattr(self, status) + 1)
        if status == "failed" and len(self.failures) < KEEP_FAILED:
            self.failures.append(row)
        if len(self.rows) < KEEP_ROWS:
            self.rows.append(row)
        else:
            self.kept_all = False

    @property
    def images_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        head = f"interrupted ({signal.Signals(self.interrupted).name})" if self.interrupted else "done"
        return (
            f"{head}: {self.ok} ok, {self.failed} failed, {self.skipped} skipped"
            f"{f' ({self.already} done by an earlier run)' if self.already else ''} in {self.seconds:.1f}s "
            f"({self.images_per_second:.2f} images/s, {self.runner or 'nothing to run'})"
            + (f"; manifest: {self.manifest}" if self.manifest else "")
        )
