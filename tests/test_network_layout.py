"""Full-size released networks build on the meta device with the official key names and shapes.

The facts below were read from the official code (nv-tlabs/PiD: pid_net.py, pixeldit_official.py,
lq_projection_2d.py, configs/common/defaults/net.py and the experiment configs).
"""

import pytest
import torch

from pipeline.model.loading import to_official, to_ours
from pipeline.model.network import PidNet
from pipeline.model.presets import PRESETS, get_preset

COMMON = {  # PID_SR4X backbone: hidden 1536, 24 heads, 14 patch blocks, 2 pixel blocks, pixel dim 16, text 2304×300
    "s_embedder.proj.weight": [1536, 768],
    "t_embedder.mlp.0.weight": [1536, 256],
    "y_embedder.proj.weight": [1536, 2304],
    "y_embedder.norm.weight": [1536],
    "y_pos_embedding": [1, 300, 1536],
    "pixel_embedder.proj.weight": [16, 3],
    "patch_blocks.13.adaLN_modulation_img.0.weight": [9216, 1536],
    "patch_blocks.13.adaLN_modulation_txt.0.weight": [9216, 1536],
    "patch_blocks.0.attn.qkv_x.weight": [4608, 1536],
    "patch_blocks.0.attn.q_norm_x.weight": [64],
    "patch_blocks.0.mlp_x.w1.weight": [4096, 1536],
    "patch_blocks.0.mlp_y.w2.weight": [1536, 4096],
    "pixel_blocks.1.adaLN_modulation.0.weight": [24576, 1536],
    "pixel_blocks.1.compress_to_attn.weight": [1152, 4096],
    "pixel_blocks.1.expand_from_attn.weight": [4096, 1152],
    "pixel_blocks.1.attn.qkv.weight": [3456, 1152],
    "pixel_blocks.1.attn.q_norm.weight": [72],
    "pixel_blocks.1.mlp.fc1.weight": [64, 16],
    "final_layer.linear.weight": [3, 16],
    "lq_proj.output_heads.6.bias": [1536],
}
V1 = {"lq_proj.output_heads.0.weight": [1536, 512], "lq_proj.gate_modules.6.content_proj.weight": [1536, 3072],
      "lq_proj.latent_proj.6.block.5.weight": [512, 512, 3, 3]}  # fmt: skip
V1PT5 = {
    "lq_proj.output_heads.0.weight": [1536, 1024],
    "lq_proj.gate_modules.6.content_proj.weight": [1, 3072],  # per-token gate
    "lq_proj.pit_head.weight": [1536, 1024],
    "pit_lq_gate.content_proj.weight": [1, 3072],
    "pit_lq_gate.log_alpha": [],
    "lq_proj.lq_aux_rgb_head.0.weight": [1024],  # training-only aux RGB head (LayerNorm, Linear, SiLU, Linear)
    "lq_proj.lq_aux_rgb_head.3.weight": [48, 1024],
}
LATENT_IN = {  # first conv of the latent branch: [hidden, latent channels after unpatchify/fold, 3, 3]
    "flux-2k": [512, 16, 3, 3], "sd3-2k": [512, 16, 3, 3], "flux2-2k": [512, 128, 3, 3],
    "dinov2-2k": [512, 768, 3, 3], "siglip-sr8x-2k": [512, 1152, 3, 3], "sd3-2kto4k": [512, 16, 3, 3],
    "sdxl-2kto4k": [512, 4, 3, 3], "flux-2kto4k-v1.5": [1024, 16, 3, 3], "flux2-2kto4k-v1.5": [1024, 32, 3, 3],
    "qwenimage-2kto4k-v1.5": [1024, 16, 3, 3],
}  # fmt: skip
ABSENT_V1 = [
    "lq_proj.pit_head.weight", "pit_lq_gate.log_alpha", "lq_proj.lq_aux_rgb_head.0.weight",
    "lq_proj.image_conv.0.weight", "lq_proj.gate_modules.7.log_alpha", "patch_blocks.14.norm_x1.weight",
]  # fmt: skip


def official_shapes(preset_name):
    with torch.device("meta"):
        net = PidNet(get_preset(preset_name).config)
    return {to_official(k): list(v.shape) for k, v in net.state_dict().items()}, net


@pytest.mark.parametrize("name", sorted(LATENT_IN))
def test_released_layout(name):
    shapes, net = official_shapes(name)
    n = sum(p.numel() for p in net.parameters())
    print(f"{name}: {n:,} parameters")
    assert 1.25e9 < n < 1.5e9  # the 1.3B-parameter PixelDiT + LQ projection
    v15 = get_preset(name).variant == "2kto4k_v1pt5"
    facts = {**COMMON, **(V1PT5 if v15 else V1), "lq_proj.latent_proj.0.weight": LATENT_IN[name]}
    for key, shape in facts.items():
        assert shapes.get(key) == shape, f"{name}: {key} is {shapes.get(key)}, expected {shape}"
    absent = ABSENT_V1[3:] if v15 else ABSENT_V1
    for key in absent:
        assert key not in shapes, f"{name}: unexpected key {key}"
    assert sum(k.startswith("lq_proj.output_heads.") and k.endswith(".weight") for k in shapes) == 7


def test_key_mapping_round_trips_for_every_preset():
    for name in PRESETS:
        shapes, _ = official_shapes(name)
        for k in shapes:
            assert to_official(to_ours(k)) == k
        assert not any(".mod_img." in k or k.endswith(".mod.weight") for k in shapes)


def test_v15_uses_replicate_padding_and_ntk_rope_2048():
    cfg = get_preset("flux-2kto4k-v1.5").config
    assert (cfg.lq_conv_padding_mode, cfg.rope_mode, cfg.rope_ref_h) == ("replicate", "ntk_aware", 2048)
    with torch.device("meta"):
        net = PidNet(cfg)
    convs = [m for m in net.lq_proj.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs and all(c.padding_mode == "replicate" for c in convs)


def test_sdxl_preset_noises_its_latent_variance_preserving():
    assert get_preset("sdxl").latent_noise == "vp"
    assert all(p.latent_noise == "flow" for n, p in PRESETS.items() if not n.startswith("sdxl"))
