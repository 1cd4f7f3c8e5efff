"""What conditions a PiD network, as data: one frozen record per VAE family (`FAMILIES`), plain data, no torch.

A preset names its family by a word (`Preset.vae`: "flux1", "sdxl", "dinov2", "rgb", ...; that word is what preset
files and `Preset.describe()` hold) and everything that depends on the family asks the record, `preset.family`:

- its LQ encoder: the module under `pipeline/encoders/` whose `PARAMS` (the parameters dataclass) and `load` build
  it, the parameters the official tokenizer uses (the latent's normalisation: Flux-style scale · (mean − shift),
  Flux2's batch-norm statistics, Qwen-Image's per-channel mean and std) and the weight files it loads;
- its latent: channels and input pixels per latent pixel (what the released networks are built for), the
  `--latent-format` names its generators' latents come in (`formats`; packed token sequences in `packed`, with the
  side of the patch folded into each token) and the frame its noise is in (`NoiseFrame`: flow matching, or
  variance preserving for SDXL);
- what kind of conditioning it is: a VAE latent per pixel block (a generator's latent can stand in for the encoder:
  `pidray decode`), a representation encoder's one grid for the whole image (`global_grid`), or the LQ pixels
  themselves (`pixels`, no encoder).

A new VAE family is one `Family` record here (and its encoder module, unless an existing one loads it); a family word
with no record (a preset file's) is a latent VAE whose encoder pidray does not have: it decodes latents only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HUB_REPO = "nvidia/PiD"


@dataclass(frozen=True)
class WeightFile:
    """One thing a preset loads besides its network, and where it comes from.

    role: "vae" (the LQ encoder's weights), "encoder" (a transformers model folder), "stats" (latent statistics);
    local: its path under the weights directory; repo: the hub repository it is downloaded from; files: for a
    folder, the files to fetch into it (else `local` is also the file's path in `repo`, unless `remote` says
    otherwise); licence: what the user accepts by downloading it."""

    role: str
    local: str
    repo: str = HUB_REPO
    files: tuple[str, ...] = ()
    remote: str | None = None
    licence: str = "NVIDIA non-commercial licence (https://huggingface.co/nvidia/PiD)"


@dataclass(frozen=True)
class NoiseFrame:
    """How a latent is noised (degrade_sigma) and how a captured x_t's sigma reads: flow matching,
    x_t = (1 − σ)·x0 + σ·ε with σ in [0, 1], or variance preserving (SDXL), sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε, into which
    an Euler scheduler's x0 + σ·ε (σ unbounded) is moved (`pipeline.latents.to_training_frame`)."""

    name: str  # what `Preset.latent_noise` holds
    variance_preserving: bool


FLOW = NoiseFrame("flow", False)
VP = NoiseFrame("vp", True)
NOISE_FRAMES = {f.name: f for f in (FLOW, VP)}


def noise_frame(name: str) -> NoiseFrame:
    """The frame a preset's `latent_noise` names (any word but "vp" is flow matching)."""
    return NOISE_FRAMES.get(name, FLOW)


@dataclass(frozen=True)
class Family:
    name: str  # the word a preset names it by (`Preset.vae`)
    encoder_module: str | None = None  # a module with `PARAMS` and `load`; None: no encoder here (or pixels)
    encoder: dict = field(default_factory=dict)  # the official parameters (fields of the module's PARAMS)
    checkpoint: str | None = None  # the VAE's weight file, its path inside the hub repository
    files: tuple[WeightFile, ...] = ()  # weights from other repositories (representation encoders)
    channels: int = 0  # latent channels the released networks take (0: not known here)
    down: int = 8  # input pixels per latent pixel on each side
    formats: tuple[str, ...] = ()  # `--latent-format` names of its latents, the generators' (and its own) names
    packed: dict[str, int] = field(default_factory=dict)  # packed format -> side of the patch in each token
    noise: NoiseFrame = FLOW
    global_grid: bool = False  # one latent grid for the whole image (a representation encoder)
    pixels: bool = False  # conditioned on the LQ image itself: no encoder, no latent
    hint: str = ""  # what its latent is, said when a latent's channels do not fit

    @property
    def implemented(self) -> bool:
        """pidray can make its conditioning from an image (an encoder module, or the pixels themselves)."""
        return self.pixels or self.encoder_module is not None

    @property
    def latent(self) -> bool:
        """A VAE latent per pixel block, which a generator's latent can stand in for (`pidray decode`)."""
        return not (self.pixels or self.global_grid)

    @property
    def latent_formats(self) -> tuple[str, ...]:
        """Every format name its latents are read in: the plain ones, then the packed ones."""
        return (*self.formats, *self.packed)


_FLUX_VAE = "pipeline.encoders.flux_vae"  # the Flux-style conv encoder: Flux1, SD3, SDXL, Flux2
_RAE = "pipeline.encoders.rae"  # DINOv2 / SigLIP-2 on transformers' classes
_APACHE = "Apache-2.0 (see the model card of {})"

# Encoder parameters as the official tokenizers give them: Flux-style latent = scale · (mean − shift) (Flux2:
# batch-norm statistics instead); Qwen-Image: per-channel latent mean and std (the values of diffusers'
# AutoencoderKLQwenImage config). Representation encoders: DINOv2-with-registers-base at 448 with RAE statistics,
# SigLIP-2 So400M/14 at 224 with an affine-free token LayerNorm; their weights from their hub ids, the RAE statistics
# from the RAE release (`hf download nyu-visionx/RAE-collections`, kept at the official `checkpoints/rae/...` path).
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("flux1", _FLUX_VAE, {"scale_factor": 0.3611, "shift_factor": 0.1159}, "checkpoints/ae.safetensors",
           channels=16, formats=("flux", "zimage", "flux1"), packed={"flux-packed": 2}),
    Family("sd3", _FLUX_VAE, {"scale_factor": 1.5305, "shift_factor": 0.0609},
           "checkpoints/sd3_vae/vae/diffusion_pytorch_model.safetensors", channels=16, formats=("sd3",)),
    Family("sdxl", _FLUX_VAE, {"z_channels": 4, "scale_factor": 0.13025, "shift_factor": 0.0, "quant_conv": True},
           "checkpoints/sdxl_vae.safetensors", channels=4, formats=("sdxl",), noise=VP),
    Family("qwenimage", "pipeline.encoders.qwen_vae", {
        "dim": 96, "z_channels": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
        "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                         0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
        "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                        1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
    }, "checkpoints/QwenImage_VAE_2d.pth", channels=16, formats=("qwenimage",), packed={"qwenimage-packed": 2}),
    Family("flux2", _FLUX_VAE, {"z_channels": 32, "quant_conv": True, "patch": 2, "batch_norm": True},
           "checkpoints/flux2_ae.safetensors", channels=128, down=16, formats=("flux2",),
           packed={"flux2-packed": 1}, hint="Flux2: the 128-channel patchified, batch-norm normalised latent"),
    Family("dinov2", _RAE, {"family": "dinov2", "latent_channels": 768, "resize": 448, "antialias": False,
                            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "latent_stats": True},
           files=(
               WeightFile("encoder", "encoders/dinov2-with-registers-base", "facebook/dinov2-with-registers-base",
                          ("config.json", "model.safetensors"),
                          licence=_APACHE.format("facebook/dinov2-with-registers-base")),
               WeightFile("stats", "checkpoints/rae/stats/dinov2/wReg_base/imagenet1k_512/stat.pt",
                          "nyu-visionx/RAE-collections", remote="stats/dinov2/wReg_base/imagenet1k_512/stat.pt",
                          licence="see the model card of nyu-visionx/RAE-collections"),
           ), channels=768, down=16, global_grid=True),
    Family("siglip", _RAE, {"family": "siglip", "latent_channels": 1152, "resize": 224, "antialias": True,
                            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "latent_stats": False,
                            "token_norm_eps": 1e-6},
           files=(
               WeightFile("encoder", "encoders/siglip2-so400m-patch14-224", "google/siglip2-so400m-patch14-224",
                          ("config.json", "model.safetensors"),
                          licence=_APACHE.format("google/siglip2-so400m-patch14-224")),
           ), channels=1152, down=16, global_grid=True),
    Family("rgb", channels=3, down=1, pixels=True),
]}  # fmt: skip

# --latent-format name -> the family whose presets decode it (plain names first, then the packed ones)
FORMATS: dict[str, str] = {
    **{n: f.name for f in FAMILIES.values() for n in f.formats},
    **{n: f.name for f in FAMILIES.values() for n in f.packed},
}


def get_family(name: str) -> Family:
    """The record of a family word; a word with none is a latent VAE whose encoder pidray does not have."""
    return FAMILIES.get(name) or Family(name)


def format_family(fmt: str) -> Family | None:
    """The family whose latents a `--latent-format` name (any case) holds; None for no such format."""
    name = FORMATS.get(str(fmt).lower())
    return None if name is None else FAMILIES[name]
