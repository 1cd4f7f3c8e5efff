"""LQ encoders against the field's library (diffusers) on tiny random weights, and each implemented VAE preset end
to end through the stage graph on a tiny random stand-in laid out like the hub repository (issue 13)."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline.encoders.flux_vae import FluxEncoderParams, load_flux_encoder
from pipeline.graph import StageGraph
from pipeline.model.config import PidConfig
from pipeline.model.loading import read_state_dict, to_official
from pipeline.model.network import PidNet
from pipeline.model.presets import PRESETS, Preset, get_preset
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions

from conftest import png_bytes

diffusers = pytest.importorskip("diffusers")


def tiny_autoencoder_kl(z: int, quant_conv: bool, seed: int = 0):
    """diffusers' AutoencoderKL, tiny (32/64 channels, 8× down), random weights — the SD/SDXL/Flux1 family."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=z, layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), use_quant_conv=quant_conv, use_post_quant_conv=quant_conv,
    )  # fmt: skip
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make the moments far from trivial
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae.eval()


def _params(z: int, quant_conv: bool, scale: float, shift: float) -> FluxEncoderParams:
    return FluxEncoderParams(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=z, scale_factor=scale,
                             shift_factor=shift, quant_conv=quant_conv)  # fmt: skip


@pytest.mark.parametrize(
    "family,z,quant_conv,scale,shift",
    [("sdxl", 4, True, 0.13025, 0.0), ("sd3", 16, False, 1.5305, 0.0609), ("flux1", 16, False, 0.3611, 0.1159)],
)
def test_our_vae_encoder_matches_diffusers(family, z, quant_conv, scale, shift):
    """Our encoder (loading the diffusers-layout file the checkpoints ship) vs diffusers' AutoencoderKL on the same
    tiny random weights: scale · (posterior mean − shift), ≤ 1e-5. Ours is kept for these three (one class, encoder
    weights only, its memory-bounded tiling); the preset's own parameters are used."""
    vae = tiny_autoencoder_kl(z, quant_conv)
    preset_params = FluxEncoderParams.from_dict(get_preset({"sdxl": "sdxl-2kto4k", "sd3": "sd3-2k",
                                                            "flux1": "flux-2k"}[family]).encoder)  # fmt: skip
    assert (preset_params.z_channels, preset_params.quant_conv) == (z, quant_conv)
    assert (preset_params.scale_factor, preset_params.shift_factor) == (scale, shift)
    ours = load_flux_encoder(_params(z, quant_conv, scale, shift), dict(vae.state_dict()))
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        want = scale * (vae.encode(x).latent_dist.mean - shift)
        got = ours.encode(x)
    assert got.shape == (2, z, 8, 6) and ours.down_factor == 8
    assert (got - want).abs().max().item() <= 1e-5


@pytest.fixture
def tiny_sdxl_preset(golden_dir, tmp_path, monkeypatch):
    """`sdxl-2kto4k` in miniature: a random PiD network of the golden config with SDXL's 4 latent channels, and a
    tiny diffusers AutoencoderKL with a quant conv, saved where the hub repository keeps them."""
    _, meta = read_state_dict(golden_dir / "pid_v1_flux.safetensors")
    cfg = PidConfig.from_official({**json.loads(meta["config"]), "lq_latent_channels": 4})
    real = get_preset("sdxl-2kto4k")
    preset = Preset("tiny-sdxl", cfg, "checkpoints/tiny_sdxl/model_ema_bf16.pth", "sdxl", "2kto4k",
                    real.vae_checkpoint, latent_noise=real.latent_noise, text_encoder="none", envelope=(128, 128),
                    encoder={**real.encoder, "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1})  # fmt: skip
    torch.manual_seed(0)
    net = PidNet(cfg)
    (tmp_path / "checkpoints/tiny_sdxl").mkdir(parents=True)
    torch.save({f"net.{to_official(k)}": v for k, v in net.state_dict().items()}, tmp_path / preset.checkpoint)
    vae = tiny_autoencoder_kl(4, True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / preset.vae_checkpoint))
    monkeypatch.setitem(PRESETS, preset.name, preset)
    return ModelOptions(preset="tiny-sdxl", weights=str(tmp_path))


@pytest.mark.parametrize("hw", [(20, 12), (37, 50)])
def test_sdxl_preset_upscales_images(tiny_sdxl_preset, hw):
    """SDXL: variance-preserving latent noise for degrade_sigma, one tile and tiled; exactly 4× the input, and the
    same seed gives the same bytes."""
    graph = StageGraph(tiny_sdxl_preset, UpscaleOptions(overlap=1, degrade_sigma=0.3, seed=11))
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)))
    rows = list(graph.run_local([{"key": "a", "bytes": data}, {"key": "b", "bytes": data}]))
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert Image.open(io.BytesIO(rows[0]["output"])).size == (hw[1] * 4, hw[0] * 4)
    assert rows[0]["output"] == rows[1]["output"]
    assert rows[0]["plan"]["unit"] == 8


def tiny_flux2(seed: int = 0):
    """diffusers' AutoencoderKLFlux2, tiny (8 latent channels), random weights and batch-norm statistics."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLFlux2(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=8)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.5)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return vae.eval()


FLUX2_TINY = {"ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "z_channels": 8}


def test_flux2_encoder_matches_the_diffusers_recipe():
    """Flux2: encoder + quant conv, mean patchified 2×2 (diffusers' Flux2 pipeline's own `_patchify_latents`), then
    normalised by the VAE's batch-norm running statistics — from the diffusers file and from BFL's layout (which
    keeps the quant conv inside the encoder)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    from pipeline.encoders.flux_vae import from_diffusers

    vae = tiny_flux2()
    params = FluxEncoderParams.from_dict({**get_preset("flux2-2k").encoder, **FLUX2_TINY})
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        z = Flux2Pipeline._patchify_latents(vae.encode(x).latent_dist.mean)
        want = (z - vae.bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
            vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)  # fmt: skip
        diff = load_flux_encoder(params, dict(vae.state_dict()))
        bfl_tensors = {("encoder." + k if k.startswith("quant_conv.") else k): v
                       for k, v in from_diffusers(dict(vae.state_dict())).items()}  # fmt: skip
        assert "encoder.quant_conv.weight" in bfl_tensors and "bn.running_var" in bfl_tensors
        bfl = load_flux_encoder(params, bfl_tensors)
        got_diff, got_bfl = diff.encode(x), bfl.encode(x)
    assert got_diff.shape == (2, 32, 4, 3) and diff.down_factor == 16 and diff.latent_channels == 32
    assert (got_diff - want).abs().max().item() <= 1e-5 and torch.equal(got_diff, got_bfl)


@pytest.mark.parametrize("name", ["flux-2k", "sd3-2k", "sdxl-2kto4k", "flux2-2k", "flux2-2kto4k-v1.5",
                                  "qwenimage-2kto4k-v1.5", "dinov2-2k", "siglip-sr8x-2k"])  # fmt: skip
def test_each_implemented_vae_preset_fits_its_network(name):
    """The preset's encoder parameters give the latent its network was trained on: channels and down factor."""
    from pipeline.runtime import encoder_params

    p = get_preset(name)
    params = encoder_params(p)
    assert params.latent_channels == p.config.lq_latent_channels
    assert params.down_factor == p.config.latent_spatial_down_factor


def build_stand_in(name: str, golden_dir, root):
    """A released preset in miniature, written under `root` as the hub repository lays it out: its network config
    with the golden fixture's small sizes (random weights), its encoder as a tiny model of the library class; also
    `root/preset.json` (the preset as a file, for processes a monkeypatch does not reach: Ray workers, the CLI)."""
    import dataclasses

    real = get_preset(name)
    _, meta = read_state_dict(golden_dir / "pid_v1_flux.safetensors")
    small = PidConfig.from_official(json.loads(meta["config"]))
    sizes = ("hidden_size", "num_groups", "pixel_hidden_size", "pixel_attn_hidden_size", "pixel_num_groups",
             "patch_depth", "pixel_depth", "txt_embed_dim", "txt_max_length", "lq_hidden_dim",
             "lq_num_res_blocks", "lq_interval", "rope_ref_h", "rope_ref_w")  # fmt: skip
    if real.global_latent:  # the transformers folder (+ RAE statistics) where the preset's files say
        files = {f.role: root / f.local for f in real.encoder_files}
        encoder = save_tiny_rae(real.vae, files["encoder"], files.get("stats"))
        vae, lat_ch = None, encoder["latent_channels"]
    elif real.vae == "flux2":
        vae, extra = tiny_flux2(), FLUX2_TINY
    elif real.vae == "qwenimage":
        vae, extra = tiny_qwen(), QWEN_TINY
    else:
        z = FluxEncoderParams.from_dict(real.encoder).z_channels
        vae = tiny_autoencoder_kl(z, FluxEncoderParams.from_dict(real.encoder).quant_conv)
        extra = {"ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1}
    if vae is not None:
        encoder = {**real.encoder, **extra}
        lat_ch = 16 if real.vae == "qwenimage" else FluxEncoderParams.from_dict(encoder).latent_channels
    cfg = dataclasses.replace(real.config, **{k: getattr(small, k) for k in sizes}, lq_latent_channels=lat_ch)
    preset = dataclasses.replace(real, name=f"tiny-{name}", config=cfg, checkpoint=f"checkpoints/tiny-{name}.pth",
                                 text_encoder="none", envelope=(128, 128), encoder=encoder,
                                 tile_overlap=1)  # fmt: skip
    (root / preset.checkpoint).parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = PidNet(cfg)
    torch.save({f"net.{to_official(k)}": v for k, v in net.state_dict().items()}, root / preset.checkpoint)
    if vae is None:
        pass
    elif real.vae == "qwenimage":  # the official 2D file: a plain state dict in its own layout
        from pipeline.encoders.qwen_vae import from_diffusers

        torch.save(from_diffusers(dict(vae.state_dict())), root / preset.vae_checkpoint)
    else:
        (root / preset.vae_checkpoint).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(root / preset.vae_checkpoint))
    (root / "preset.json").write_text(json.dumps(preset.describe()))
    return preset


@pytest.fixture
def stand_in(golden_dir, tmp_path, monkeypatch):
    """`make(name)`: `build_stand_in` registered under its name for this test; returns its ModelOptions."""

    def make(name: str) -> ModelOptions:
        preset = build_stand_in(name, golden_dir, tmp_path / name)
        monkeypatch.setitem(PRESETS, preset.name, preset)
        return ModelOptions(preset=preset.name, weights=str(tmp_path / name))

    return make


@pytest.mark.parametrize(
    "name", [n for n, p in PRESETS.items() if not p.bundled and p.task == "upscale" and p.sampler == "distilled"]
)
@pytest.mark.parametrize("hw", [(20, 12), (37, 50)])
def test_released_preset_stand_ins_upscale_images(stand_in, name, hw):
    """Each VAE preset through the stage graph: one tile and tiled, exactly `scale ×` the input, the same seed gives
    the same bytes (SDXL: variance-preserving latent noise; Flux2 v1.5: its 128-channel latent unpatchified ×2;
    Qwen-Image: the official 2D `.pth` layout; DINOv2/SigLIP: one grid for the image spread over the tiles, SigLIP
    at 8×)."""
    graph = StageGraph(stand_in(name), UpscaleOptions(overlap=1, degrade_sigma=0.3, seed=11))
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)))
    rows = list(graph.run_local([{"key": "a", "bytes": data}, {"key": "b", "bytes": data}]))
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    scale = get_preset(name).scale
    assert Image.open(io.BytesIO(rows[0]["output"])).size == (hw[1] * scale, hw[0] * scale)
    assert rows[0]["output"] == rows[1]["output"]
    assert rows[0]["plan"]["unit"] == get_preset(name).lq_unit


def tiny_qwen(seed: int = 0):
    """diffusers' AutoencoderKLQwenImage (a causal video VAE), tiny, random weights, Qwen-Image's latent statistics."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval()


QWEN_TINY = {"dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}


def test_qwen_image_encoder_matches_diffusers_on_one_frame():
    """Qwen-Image: our 2D encoder (the official 2D layout), loading diffusers' 3D weights, vs diffusers'
    AutoencoderKLQwenImage on a one-frame video: (posterior mean − latents_mean) / latents_std, ≤ 1e-5; the preset's
    statistics are diffusers' config defaults."""
    from pipeline.encoders.qwen_vae import QwenEncoderParams, from_diffusers, load_qwen_encoder

    vae = tiny_qwen()
    preset = get_preset("qwenimage-2kto4k-v1.5")
    assert preset.encoder["latents_mean"] == list(vae.config.latents_mean)
    assert preset.encoder["latents_std"] == list(vae.config.latents_std)
    params = QwenEncoderParams.from_dict({**preset.encoder, **QWEN_TINY})
    ours = load_qwen_encoder(params, dict(vae.state_dict()))
    official_layout = load_qwen_encoder(params, from_diffusers(dict(vae.state_dict())))
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        mean = vae.encode(x[:, :, None]).latent_dist.mean[:, :, 0]
        m = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        s = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        want = (mean - m) / s
        got = ours.encode(x)
        assert torch.equal(got, official_layout.encode(x))
    assert got.shape == (2, 16, 8, 6) and ours.down_factor == 8 and ours.latent_channels == 16
    assert (got - want).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------- representation encoders
RAE_TINY = {  # transformers configs of the real classes, tiny; the encoders' fixed input side scaled down with them
    "dinov2": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
               "patch_size": 14, "image_size": 70, "num_register_tokens": 4},
    "siglip": {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
               "patch_size": 14, "image_size": 56},
}  # fmt: skip


def save_tiny_rae(family: str, folder, stats_path=None, seed: int = 0) -> dict:
    """A tiny random model of the class the hub repository holds, saved as that repository lays it out
    (config.json + model.safetensors; SigLIP as the whole image-text model, as google/siglip2-* ship), plus the RAE
    statistics file for DINOv2. Returns the preset's encoder parameters for it."""
    import transformers

    torch.manual_seed(seed)
    kw = RAE_TINY[family]
    if family == "dinov2":
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**kw))
    else:
        text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                "vocab_size": 64}  # fmt: skip
        model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=kw, text_config=text))
    with torch.no_grad():  # move the LayerNorm affines off 1/0 so that dropping or keeping them shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(str(folder))
    resize, grid = 56, 4
    encoder = {**get_preset({"dinov2": "dinov2-2k", "siglip": "siglip-sr8x-2k"}[family]).encoder,
               "latent_channels": kw["hidden_size"], "resize": resize}  # fmt: skip
    if stats_path is not None:
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed + 1)
        torch.save({"mean": torch.randn(kw["hidden_size"], grid, grid, generator=g),
                    "var": torch.rand(kw["hidden_size"], grid, grid, generator=g) + 0.5}, stats_path)  # fmt: skip
    return encoder


@pytest.mark.parametrize("family", ["dinov2", "siglip"])
def test_representation_encoder_matches_the_official_recipe(family, tmp_path):
    """DINOv2-with-registers / SigLIP-2 through transformers' classes on tiny random weights, against the official
    tokenizers' recipe written out here from the library model's raw hidden states: [0,1], bicubic to the fixed side
    (SigLIP antialiased), processor mean/std, the last layer's tokens through an affine-free LayerNorm (DINOv2: its
    own final norm without affine, eps 1e-6; SigLIP: the post-LN bypassed, then LN eps 1e-6), CLS + registers
    dropped, a square grid, DINOv2's per-(C,H,W) statistics (eps 1e-5) — <= 1e-5; one grid whatever the input size."""
    import transformers

    from pipeline.encoders.rae import RAEParams, load_rae_encoder

    stats = tmp_path / "stat.pt" if family == "dinov2" else None
    params = RAEParams.from_dict(save_tiny_rae(family, tmp_path / "enc", stats))
    ours = load_rae_encoder(params, {"encoder": tmp_path / "enc", "stats": stats})
    assert ours.global_latent and ours.latent_channels == RAE_TINY[family]["hidden_size"] and ours.down_factor == 16
    ref_cls = transformers.Dinov2WithRegistersModel if family == "dinov2" else transformers.SiglipVisionModel
    ref = ref_cls.from_pretrained(str(tmp_path / "enc")).eval()
    for hw in [(64, 48), (56, 56), (100, 30)]:
        x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.inference_mode():
            got = ours.encode(x)
            v = (x + 1) / 2
            if hw != (56, 56):
                v = torch.nn.functional.interpolate(v, size=(56, 56), mode="bicubic", align_corners=False,
                                                    antialias=family == "siglip")  # fmt: skip
            mean, std = torch.tensor(params.mean).view(1, 3, 1, 1), torch.tensor(params.std).view(1, 3, 1, 1)
            h = ref(pixel_values=(v - mean) / std, output_hidden_states=True).hidden_states[-1]
            h = torch.nn.functional.layer_norm(h, (h.shape[-1],), eps=1e-6)[:, 5 if family == "dinov2" else 0 :]
            want = h.transpose(1, 2).reshape(2, -1, 4, 4)
            if stats is not None:
                s = torch.load(stats, weights_only=True)
                want = (want - s["mean"]) / torch.sqrt(s["var"] + 1e-5)
        assert got.shape == (2, RAE_TINY[family]["hidden_size"], 4, 4)
        assert (got - want).abs().max().item() <= 1e-5, hw


def test_representation_encoder_refuses_wrong_files(tmp_path):
    """A folder that holds another model, a missing statistics file, statistics of the wrong grid: each one clear
    error at load or encode, never a silently different latent."""
    from pipeline.encoders.rae import RAEParams, load_rae_encoder

    enc = save_tiny_rae("siglip", tmp_path / "siglip")
    with pytest.raises(ValueError, match="model_type 'siglip'"):  # a SigLIP folder given to the DINOv2 preset
        load_rae_encoder(RAEParams.from_dict({**enc, "family": "dinov2", "latent_stats": False}),
                         {"encoder": tmp_path / "siglip"})  # fmt: skip
    d = save_tiny_rae("dinov2", tmp_path / "dino")
    with pytest.raises(ValueError, match="statistics"):
        load_rae_encoder(RAEParams.from_dict(d), {"encoder": tmp_path / "dino"})
    torch.save({"mean": torch.zeros(32, 3, 3), "var": torch.ones(32, 3, 3)}, tmp_path / "bad.pt")
    ours = load_rae_encoder(RAEParams.from_dict(d), {"encoder": tmp_path / "dino", "stats": tmp_path / "bad.pt"})
    with pytest.raises(ValueError, match="statistics are"):
        ours.encode(torch.zeros(1, 3, 56, 56))
    with pytest.raises(ValueError, match="hidden size"):
        load_rae_encoder(RAEParams.from_dict({**enc, "latent_channels": 1152}), {"encoder": tmp_path / "siglip"})


@pytest.mark.parametrize("name", ["dinov2-2k", "siglip-sr8x-2k"])
def test_global_grid_reaches_the_network_as_the_official_alignment(stand_in, name):
    """A global encoder's grid, degraded and spread over the tile plan by the diffuse stage, gives each tile exactly
    the LQ features the official network computes from the whole grid (noise on the grid from the seeded generator,
    then nearest to the patch grid): one tile equals the official single pass; with several tiles, each tile's
    features are its window of the official whole-image features."""
    from pipeline.model.sampler import degrade_latent
    from pipeline.stages.diffuse import DiffuseStage
    from pipeline.stages.encode import plan_for

    opts = stand_in(name)
    stage = DiffuseStage(opts, UpscaleOptions(overlap=1), preset=get_preset(opts.preset))
    preset, lq = stage.preset, stage.net.lq_proj
    raw = torch.randn(preset.config.lq_latent_channels, 4, 4, generator=torch.Generator().manual_seed(3))
    for in_hw in [(16, 12), (50, 37)]:
        plan = plan_for(preset, UpscaleOptions(overlap=1), in_hw)
        gh, gw = (v // preset.config.patch_size for v in plan.canvas_hw)
        noisy = degrade_latent(raw[None], 0.4, torch.randn(1, *raw.shape, generator=torch.Generator().manual_seed(5)))
        with torch.inference_mode():
            official = lq.align_latent(noisy, gh, gw)[0]  # the whole grid, aligned to the whole patch grid
            tiles = stage._lq_tiles(raw, plan, seed=5, sigma=0.4)
            th, tw = (v // preset.config.patch_size for v in plan.tile_out)
            for tile, (y, x) in zip(tiles, plan.origins()):
                assert torch.equal(lq.align_latent(tile[None], th, tw)[0], official[:, y : y + th, x : x + tw])
        assert (plan.n_tiles == 1) == (in_hw == (16, 12))
