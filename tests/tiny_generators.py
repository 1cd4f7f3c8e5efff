"""Tiny random diffusers pipelines of the packed-latent generators (Flux, Flux2, Flux2-klein, Qwen-Image), built from
their real classes with tiny configs. Their text encoders (T5 + CLIP, Mistral-3, Qwen-3, Qwen-2.5-VL) are left out:
the tests hand the pipelines `prompt_embeds` of the transformer's joint width instead. Nothing downloads."""

from __future__ import annotations

import torch

EMBED = 32  # the transformers' joint attention width: the width of the prompt embeddings a test hands in


def _jitter(model, scale: float = 0.05):
    """Zero-initialised output layers would give a zero latent: every weight nudged."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _flux_vae():
    import diffusers

    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False,
    )  # fmt: skip


def _flux2_vae():
    import diffusers

    vae = diffusers.AutoencoderKLFlux2(
        latent_channels=32, layers_per_block=1, norm_num_groups=8, block_out_channels=(8, 8, 16, 16),
        mid_block_add_attention=False,
    )  # fmt: skip
    with torch.no_grad():  # the batch-norm statistics a trained VAE holds: not 0 and 1, so the test sees them
        vae.bn.running_mean.copy_(torch.randn(128) * 0.5)
        vae.bn.running_var.copy_(torch.rand(128) * 3 + 0.2)
    return vae.eval()


def tiny_flux():
    import diffusers

    torch.manual_seed(0)
    tr = _jitter(diffusers.FluxTransformer2DModel(
        in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=EMBED, pooled_projection_dim=EMBED, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ))  # fmt: skip
    return diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flux_vae(),
                                  text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                  transformer=tr)  # fmt: skip


def _flux2_transformer(guidance: bool):
    import diffusers

    return _jitter(diffusers.Flux2Transformer2DModel(
        in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=EMBED, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance,
    ))  # fmt: skip


def tiny_flux2():
    import diffusers

    torch.manual_seed(0)
    return diffusers.Flux2Pipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flux2_vae(),
                                   text_encoder=None, tokenizer=None, transformer=_flux2_transformer(True))  # fmt: skip


def tiny_flux2_klein():
    import diffusers

    torch.manual_seed(0)
    return diffusers.Flux2KleinPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=_flux2_vae(), text_encoder=None, tokenizer=None,
                                        transformer=_flux2_transformer(False), is_distilled=True)  # fmt: skip


def tiny_qwenimage():
    import diffusers

    torch.manual_seed(0)
    tr = _jitter(diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=EMBED, axes_dims_rope=(4, 6, 6),
    ))  # fmt: skip
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=16, num_res_blocks=1).eval()
    return diffusers.QwenImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                       text_encoder=None, tokenizer=None, transformer=tr)  # fmt: skip


def embeds(name: str, seed: int = 3) -> dict:
    """The prompt embeddings each class takes in place of its text encoder's output."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(1, 6, EMBED, generator=g)
    if name == "flux":
        return {"prompt_embeds": e, "pooled_prompt_embeds": torch.randn(1, EMBED, generator=g)}
    if name == "qwenimage":
        return {"prompt_embeds": e, "prompt_embeds_mask": torch.ones(1, 6, dtype=torch.long)}
    return {"prompt_embeds": e}


TINY = {"flux": tiny_flux, "flux2": tiny_flux2, "flux2-klein": tiny_flux2_klein, "qwenimage": tiny_qwenimage}
