"""Named model variants as data: network config + where its weights live + what conditions it.

Released presets point into the `nvidia/PiD` hub repository (NVIDIA non-commercial licence; pidray
ships none of those weights). The `small` preset is our own model, bundled in the package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.families import FAMILIES, Family, NoiseFrame, WeightFile, get_family, noise_frame
from pipeline.families import HUB_REPO as HUB_REPO
from pipeline.model.config import PidConfig

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class Preset:
    name: str
    config: PidConfig
    checkpoint: str  # path inside the hub repo, or a bundled file name for local presets
    vae: str  # its VAE family's name (`pipeline.families.FAMILIES`; `family` is the record)
    variant: str  # "2k" | "2kto4k" | "2kto4k_v1pt5" | "pidray"
    vae_checkpoint: str | None = None  # path inside the hub repo (as the official code lays it out)
    latent_noise: str = "flow"  # how degrade_sigma noises the latent: "flow" or "vp" (SDXL); `noise` is the frame
    text_encoder: str = "gemma-2-2b-it"  # or "none": a zero caption embedding (`captioned`)
    envelope: tuple[int, int] = (2048, 2048)  # output sizes (min, max long side) the checkpoint was trained on
    bundled: bool = False
    notes: str = ""
    default_steps: int = field(default=4)
    # Output pixels of the shifted-grid ensemble (PidNet.forward_shift_ensemble), 0 = off; RGB-conditioned models.
    shift_ensemble: int = 0
    # The LQ encoder's parameters as data (the fields of its family's params dataclass; missing ones default).
    encoder: dict = field(default_factory=dict)
    # Default tile overlap in latent pixels (--overlap). Released presets: 5 = 160 output pixels (fusion blends the
    # overlapping x0 estimates every step, so the seam needs no wider ramp), which keeps the pixels diffused within
    # 1.15x of the output for 2K/4K tilings (8 would be 1.20x at 2048² -> 8192²); the small model: 8 = 32 pixels.
    tile_overlap: int = 5
    # The tile side (output pixels) used when --tile is not given; None: the envelope's maximum. Set where a larger
    # tile is faster at equal quality (`pidray eval-small --sweep`: the bundled small model, on a CPU).
    default_tile: int | None = None
    # Weights the encoder loads from repositories other than the network's (representation encoders).
    encoder_files: tuple[WeightFile, ...] = ()
    # "upscale": PiD (an LQ input; `upscales`); "t2i": PixelDiT text-to-image (`generates_images`), with its sampler
    # defaults in `t2i`
    task: str = "upscale"
    t2i: dict = field(default_factory=dict)
    # "distilled": the few-step sampler (DISTILLED_T); "guided": the undistilled checkpoints' DPM-Solver++ with
    # classifier-free guidance, its defaults in `guidance` (cfg_scale; shift, None = dynamic from base_shift at
    # base_size; the negative prompt whose embedding is the unconditional caption)
    sampler: str = "distilled"
    guidance: dict = field(default_factory=dict)

    def __post_init__(self):
        from pipeline.errors import is_number
        from pipeline.model.sampling import SAMPLINGS

        if self.sampler not in SAMPLINGS:
            raise ValueError(f"preset {self.name}: sampler must be one of {sorted(SAMPLINGS)}, got {self.sampler!r}")
        steps = self.default_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 200:  # UpscaleOptions' bound
            raise ValueError(f"preset {self.name}: default_steps must be an integer in 1..200, got {steps!r}")
        unknown = sorted(set(self.guidance) - set(GUIDED_DEFAULTS))
        if unknown:
            raise ValueError(f"preset {self.name}: unknown guidance field(s) {unknown}")
        for k, v in self.guidance.items():
            ok = (
                isinstance(v, str) if k == "negative_prompt" else v is None and k == "shift" or (is_number(v) and v > 0)
            )
            if not ok:
                raise ValueError(f"preset {self.name}: guidance {k} must be "
                                 f"{'text' if k == 'negative_prompt' else 'a positive number'}, got {v!r}")  # fmt: skip

    @property
    def sampling(self):
        """How this preset samples (`pipeline.model.sampling`): its steps, guidance and work per step, bound to it."""
        from pipeline.model.sampling import SAMPLINGS

        return SAMPLINGS[self.sampler](self)

    @property
    def family(self) -> Family:
        """What conditions it (`pipeline.families`): its LQ encoder, latent formats, noise frame, kind."""
        return get_family(self.vae)

    @property
    def noise(self) -> NoiseFrame:
        """The frame its latent is noised in (flow matching, or variance preserving)."""
        return noise_frame(self.latent_noise)

    @property
    def upscales(self) -> bool:
        """A PiD model: it takes an LQ input (an image, or a latent in place of its encoder's)."""
        return self.task == "upscale"

    @property
    def generates_images(self) -> bool:
        """A text-to-image model (PixelDiT): it takes a prompt only."""
        return self.task == "t2i"

    @property
    def captioned(self) -> bool:
        """It conditions on a caption embedding from its text encoder (else a zero embedding, no encoder)."""
        return self.text_encoder != "none"

    @property
    def global_latent(self) -> bool:
        """The LQ encoder gives one fixed grid for the whole image (DINOv2/SigLIP), not a latent per pixel block."""
        return self.family.global_grid

    @property
    def decodes_latents(self) -> bool:
        """It can take a generator's latent in place of its LQ encoder (`pidray decode`): a VAE-latent preset."""
        return self.upscales and self.family.latent

    @property
    def lq_unit(self) -> int:
        """Input pixels per latent pixel of the tile plan: 1 for RGB, the VAE factor, or for a global encoder one
        latent pixel per network patch (its grid is spread over the patch grid, as the network aligns it)."""
        if self.family.pixels:
            return 1
        if self.global_latent:
            return self.config.patch_size // self.config.sr_scale
        return self.config.latent_spatial_down_factor

    def weight_files(self) -> list[WeightFile]:
        """Everything besides the network checkpoint that the preset loads."""
        out = [WeightFile("vae", self.vae_checkpoint)] if self.vae_checkpoint else []
        return out + list(self.encoder_files)

    @property
    def scale(self) -> int:
        return self.config.sr_scale

    @property
    def latent_channels(self) -> int:
        return self.config.lq_latent_channels or self.config.lq_in_channels

    def describe(self) -> dict:
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        d["scale"] = self.scale
        return d


# The released network (PID_SR4X in the official configs); v1.5 changes listed below it.
_V1 = PidConfig(
    hidden_size=1536, num_groups=24, pixel_hidden_size=16, pixel_attn_hidden_size=1152, pixel_num_groups=16,
    patch_depth=14, pixel_depth=2, patch_size=16, txt_embed_dim=2304, txt_max_length=300,
    rope_mode="ntk_aware", rope_ref_h=1024, rope_ref_w=1024,
    lq_in_channels=0, lq_latent_channels=16, lq_hidden_dim=512, lq_num_res_blocks=4,
    lq_gate_type="sigma_aware_per_token_per_dim", lq_interval=2, sr_scale=4, latent_spatial_down_factor=8,
)  # fmt: skip
_V1PT5 = dataclasses.replace(
    _V1, lq_conv_padding_mode="replicate", rope_ref_h=2048, rope_ref_w=2048, lq_aux_rgb_head=True,
    pit_lq_inject=True, lq_gate_type="sigma_aware_per_token", lq_hidden_dim=1024,
)  # fmt: skip


def _ckpt(exp: str) -> str:
    return f"checkpoints/{exp}/model_ema_bf16.pth"


# PixelDiT's official inference defaults (`PixelDiTModelConfig`, the 2K fine-tune experiment's overrides)
T2I_DEFAULTS = {
    "steps": 50, "shift": 6.0, "cfg_scale": 2.75, "size": [2048, 2048],
    "negative_prompt": "low quality, worst quality, over-saturated, three legs, six fingers, cartoon, anime, cgi, "
                       "low res, blurry, deformed, distortion, duplicated limbs, plastic skin, jpeg artifacts, "
                       "watermark",
}  # fmt: skip
# The undistilled v1.5 checkpoints' sampling defaults (the teacher experiments' model config and the official docs:
# cfg_scale 5, 25 steps, the dynamic shift 6.0 · sqrt(sqrt(H·W) / 2048); the null caption is PixelDiT's negative
# prompt, the model config's default).
GUIDED_DEFAULTS = {
    "steps": 25, "cfg_scale": 5.0, "shift": None, "base_shift": 6.0, "base_size": 2048,
    "negative_prompt": T2I_DEFAULTS["negative_prompt"],
}  # fmt: skip


def _released(name, cfg, exp, vae, variant, envelope, **kw) -> Preset:
    """A released PiD checkpoint on VAE family `vae`: the family's latent channels, down factor, noise frame,
    encoder parameters and weight files (`pipeline.families`) over the network config `cfg`."""
    fam = FAMILIES[vae]
    cfg = _R(cfg, lq_latent_channels=fam.channels, latent_spatial_down_factor=fam.down)
    return Preset(name, cfg, _ckpt(exp), vae, variant, fam.checkpoint, envelope=envelope, latent_noise=fam.noise.name,
                  encoder=dict(fam.encoder), encoder_files=fam.files, **kw)  # fmt: skip


_R = dataclasses.replace
_2K, _4K = (1536, 2688), (2048, 3840)
_V1PT5_DISTILLED = [
    _released("flux-2kto4k-v1.5", _V1PT5, "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step", "flux1",
              "2kto4k_v1pt5", _4K),
    _released("flux2-2kto4k-v1.5", _R(_V1PT5, lq_latent_unpatchify_factor=2),
              "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step", "flux2", "2kto4k_v1pt5", _4K),
    _released("qwenimage-2kto4k-v1.5", _V1PT5, "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step",
              "qwenimage", "2kto4k_v1pt5", _4K),
]  # fmt: skip
# The undistilled v1.5 checkpoints, the teachers of the 4-step students above: the same network and files beside
# them (`..._undistilled/model_ema_bf16.pth`), sampled by guided DPM-Solver++ — the reference for quality.
_V1PT5_UNDISTILLED = [
    _R(d, name=f"{d.name}-undistilled", checkpoint=d.checkpoint.replace("_distill_4step/", "_undistilled/"),
       sampler="guided", default_steps=GUIDED_DEFAULTS["steps"], guidance=dict(GUIDED_DEFAULTS),
       notes=f"the undistilled {d.name}: {GUIDED_DEFAULTS['steps']} guided steps of 2 forwards (cfg "
             f"{GUIDED_DEFAULTS['cfg_scale']:g}, dynamic shift)")
    for d in _V1PT5_DISTILLED
]  # fmt: skip
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _released("flux-2k", _V1, "PiD_res2k_sr4x_official_flux_distill_4step", "flux1", "2k", _2K),
        _released("flux2-2k", _V1, "PiD_res2k_sr4x_official_flux2_distill_4step", "flux2", "2k", _2K),
        _released("sd3-2k", _V1, "PiD_res2k_sr4x_official_sd3_distill_4step", "sd3", "2k", _2K),
        _released("dinov2-2k", _V1, "PiD_res2k_sr4x_official_dinov2_distill_4step", "dinov2", "2k", _2K,
                  tile_overlap=10),
        _released("siglip-sr8x-2k", _R(_V1, sr_scale=8), "PiD_res2k_sr8x_official_siglip_distill_4step", "siglip",
                  "2k", _2K, tile_overlap=10),
        _released("sd3-2kto4k", _V1, "PiD_res2kto4k_sr4x_official_sd3_distill_4step", "sd3", "2kto4k", _4K),
        _released("sdxl-2kto4k", _V1, "PiD_res2kto4k_sr4x_official_sdxl_distill_4step", "sdxl", "2kto4k", _4K),
        *_V1PT5_DISTILLED,
        *_V1PT5_UNDISTILLED,
        # PixelDiT text-to-image, the 2K fine-tune released with PiD (PixDiT_T2I, `pixeldit_h1536_d14p2` with
        # original RoPE; no LQ branch) and the official inference defaults of its experiment.
        Preset(
            "pixeldit-2k",
            PidConfig(rope_mode="original", rope_ref_h=2048, rope_ref_w=2048, lq_in_channels=0, lq_latent_channels=0,
                      lq_interval=1),
            "checkpoints/PixelDiT_finetune_2kto4k/model_ema_bf16.pth", "none", "t2i", None, envelope=(1024, 3840),
            task="t2i", t2i=dict(T2I_DEFAULTS), tile_overlap=0,
            notes="PixelDiT 1.3B text-to-image (2K fine-tune); pair with --upscale PRESET for 4K",
        ),
        # Our own model: conditioned on the LQ RGB image, no VAE, no caption encoder. Trained by jobs/train_small.py.
        Preset(
            "small",
            PidConfig(
                hidden_size=128, num_groups=4, pixel_hidden_size=16, pixel_attn_hidden_size=128, pixel_num_groups=4,
                patch_depth=4, pixel_depth=2, patch_size=8, txt_embed_dim=8, txt_max_length=1,
                rope_mode="original", lq_in_channels=3, lq_latent_channels=0, lq_hidden_dim=64,
                lq_num_res_blocks=8, lq_interval=1, sr_scale=4, prediction_type="x0",
                input_concat_lq=True, residual_lq=True, out_conv=32,
            ),
            "pidray_small_sr4x.safetensors", "rgb", "pidray", None, text_encoder="none",
            envelope=(128, 128), default_tile=256, bundled=True, tile_overlap=8, default_steps=1, shift_ensemble=4,
            notes="pidray's own 4x model (v2) trained on scikit-image's bundled photos; one step; runs on a CPU",
        ),
    ]
}  # fmt: skip
ALIASES = {"default": "small", "flux": "flux-2k", "sd3": "sd3-2k", "sdxl": "sdxl-2kto4k", "flux2": "flux2-2k"}


def preset_from_dict(d: dict, where: str = "preset") -> Preset:
    """A preset written as data (`Preset.describe()`'s shape): for your own checkpoints of these architectures — a
    fine-tune, a tiny model for tests — without changing pidray. Unknown fields are refused."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a preset is a JSON object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(Preset)}
    d = {k: v for k, v in d.items() if k != "scale"}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown preset field(s) {unknown}")
    try:
        kw = dict(d)
        kw["config"] = PidConfig.from_dict(d["config"])
        for k in ("envelope",):
            if k in kw:
                kw[k] = tuple(kw[k])
        kw["encoder_files"] = tuple(WeightFile(**{**f, "files": tuple(f.get("files", ()))})
                                    for f in kw.get("encoder_files", ()))  # fmt: skip
        if "t2i" in kw:
            kw["t2i"] = dict(kw["t2i"])
        return Preset(**kw)
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{where}: not a valid preset ({e})") from None


PRESET_FILES_KEPT = 16  # preset files parsed and kept (each is a few kB), keyed by path and version
MAX_PRESET_FILE_BYTES = 1 << 20  # a preset file is a short JSON document
_FILES: dict[tuple, Preset] = {}  # (resolved path, size, mtime_ns) -> Preset, oldest first


def _preset_file(name: str) -> Preset:
    """A preset file, parsed once per version: read again only when its size or mtime changed (a few kept)."""
    import json

    path = Path(name).expanduser()
    try:
        st = path.resolve().stat()
    except OSError:
        st = None
    if st is None or not path.is_file():
        raise ValueError(f"preset file not found: {name}")
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _FILES:
        return _FILES[key]
    if st.st_size > MAX_PRESET_FILE_BYTES:
        raise ValueError(f"{path}: {st.st_size:,} bytes is not a preset file (at most {MAX_PRESET_FILE_BYTES:,})")
    try:
        preset = preset_from_dict(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    _FILES[key] = preset
    while len(_FILES) > PRESET_FILES_KEPT:
        _FILES.pop(next(iter(_FILES)))
    return preset


def get_preset(name: str) -> Preset:
    """A named preset, or a preset file (`*.json`, `Preset.describe()`'s shape; its `checkpoint` a path or a file
    name under --weights). Called where a job or request enters; a file is parsed once per version."""
    if str(name).endswith(".json"):
        return _preset_file(str(name))
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(unknown_preset(name))
    return PRESETS[key]


def unknown_preset(name: str) -> str:
    """One line for a preset name that is not one: the nearest name, the upscaling presets, the aliases."""
    import difflib

    upscalers = sorted(n for n, p in PRESETS.items() if p.upscales)
    others = sorted(n for n, p in PRESETS.items() if not p.upscales)
    near = difflib.get_close_matches(str(name), [*PRESETS, *ALIASES], n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    aliases = ", ".join(f"{a}={b}" for a, b in ALIASES.items())
    generate = f"; text-to-image (pidray generate): {', '.join(others)}" if others else ""
    return f"unknown preset {name!r}{hint}; known: {', '.join(upscalers)}; aliases: {aliases}{generate}"
