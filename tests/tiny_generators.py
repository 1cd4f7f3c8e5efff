"""Tiny random diffusers pipelines built from the generators' real classes with tiny configs; nothing downloads.

`TINY`: the packed-latent generators (Flux, Flux2, Flux2-klein, Qwen-Image) without their text encoders (the tests
hand them `prompt_embeds` of the transformer's joint width). `PROMPTED`: every registered class but Z-Image
(conftest's `make_tiny_zimage`) with tiny text encoders of the real transformers classes and word-level tokenizers,
so a plain prompt runs through the pipeline's own encode_prompt."""

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


def _flux2_vae(latent_channels: int = 32):
    import diffusers

    vae = diffusers.AutoencoderKLFlux2(
        latent_channels=latent_channels, layers_per_block=1, norm_num_groups=8, block_out_channels=(8, 8, 16, 16),
        mid_block_add_attention=False,
    )  # fmt: skip
    with torch.no_grad():  # the batch-norm statistics a trained VAE holds: not 0 and 1, so the test sees them
        vae.bn.running_mean.copy_(torch.randn(4 * latent_channels) * 0.5)
        vae.bn.running_var.copy_(torch.rand(4 * latent_channels) * 3 + 0.2)
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


def _flux2_transformer(guidance: bool, in_channels: int = 128, joint: int = EMBED):
    import diffusers

    return _jitter(diffusers.Flux2Transformer2DModel(
        in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=joint, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
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


# ------------------------------------------------------------------ with their text encoders: a prompt goes in
# Tiny random text encoders of the real transformers classes and word-level tokenizers (`tokenizers`), so a plain
# prompt runs through each pipeline's own encode_prompt. The PiD stand-ins decode 16-channel latents (Flux, SD3,
# Qwen-Image), 4 (SDXL) and 32 (Flux2: an 8-channel VAE latent patchified): the VAEs here have those channels.
WORDS = "a cat sleeping on warm sunny windowsill busy city street dog red flowers the of and in user assistant system"
SPLIT = r"\w+|[^\w\s]+|\n"  # words, punctuation runs and newlines: Qwen-Image's template prefix is 34 tokens, as real
HIDDEN = 16  # every text encoder's width


def word_tokenizer(max_length: int, bos: str | None = None, eos: str = "<eos>", pad: str = "<pad>",
                   template: str | None = None):  # fmt: skip
    """A PreTrainedTokenizerFast over a few words (anything else is <unk>): `bos`/`eos` added around each text, the
    chat markers <|im_start|> <|im_end|> kept whole, `template` its chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    marks = ["<|im_start|>", "<|im_end|>"]
    vocab = {}
    for w in [pad, eos, "<unk>", *([bos] if bos else []), *marks, "\n", *WORDS.split()]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(m, special=True) for m in marks])
    around = [t for t in (bos, eos) if t]
    single = " ".join(([bos] if bos else []) + ["$A"] + ([eos] if eos else []))
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(t, vocab[t]) for t in around])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token="<unk>", model_max_length=max_length)  # fmt: skip
    if template:
        fast.chat_template = template
    return fast, vocab


def _clip(projection: int | None, hidden: int = HIDDEN):
    """A CLIP text encoder (with a projection: CLIPTextModelWithProjection) and its 16-token tokenizer; the pooled
    output is read at the first end-of-text token, which is also the padding."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok, vocab = word_tokenizer(16, bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>")
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=projection or hidden,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"])  # fmt: skip
    torch.manual_seed(2)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval(), tok


def _t5(d_model: int):
    """A T5 encoder (one layer) and its tokenizer: the pipelines pad to their max_sequence_length."""
    from transformers import T5Config, T5EncoderModel

    tok, vocab = word_tokenizer(512, eos="</s>")
    torch.manual_seed(3)
    cfg = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)  # fmt: skip
    return T5EncoderModel(cfg).eval(), tok


_QWEN_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip
_MISTRAL_CHAT = ("{% for m in messages %}[{{ m['role'] }}] {% for c in m['content'] %}{{ c['text'] }} {% endfor %}"
                 "{% endfor %}")  # fmt: skip


def _qwen3(layers: int):
    """Qwen3ForCausalLM (FLUX.2-klein's text encoder) with `layers` layers: klein reads hidden states 9, 18, 27."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok, vocab = word_tokenizer(512, eos="<|im_end|>", template=_QWEN_CHAT)
    torch.manual_seed(4)
    cfg = Qwen3Config(vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                      pad_token_id=0)  # fmt: skip
    return Qwen3ForCausalLM(cfg).eval(), tok


def _mistral3():
    """Mistral3ForConditionalGeneration (FLUX.2's text encoder: a Pixtral vision tower, unused by a text prompt, and a
    Mistral language model of 30 layers, as FLUX.2 reads hidden states 10, 20, 30). Its tokenizer is a plain fast
    tokenizer whose chat template reads the pipeline's [{"type": "text", ...}] messages, where the hub's is a
    PixtralProcessor."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    tok, vocab = word_tokenizer(512, bos="<s>", eos="</s>", template=_MISTRAL_CHAT)
    text = MistralConfig(vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                         pad_token_id=0, sliding_window=None)  # fmt: skip
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=8, image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(5)
    cfg = Mistral3Config(text_config=text, vision_config=vision, image_token_index=len(vocab) - 1,
                         spatial_merge_size=1)  # fmt: skip
    return Mistral3ForConditionalGeneration(cfg).eval(), tok


def _qwen25vl():
    """Qwen2_5_VLForConditionalGeneration (Qwen-Image's text encoder), a one-block vision tower and a 2-layer language
    model; Qwen-Image reads its last hidden state after its template's first 34 tokens."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok, vocab = word_tokenizer(1024, eos="<|im_end|>")
    n = len(vocab)
    text = dict(vocab_size=n + 4, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]})  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=HIDDEN,
                  fullatt_block_indexes=[0], window_size=32, patch_size=4)  # fmt: skip
    torch.manual_seed(6)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=n, video_token_id=n + 1,
                           vision_start_token_id=n + 2, vision_end_token_id=n + 3)  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(cfg).eval(), tok


def _kl_vae(z: int, scale: float, shift: float | None, quant_conv: bool = False):
    import diffusers

    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=z, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), scaling_factor=scale, shift_factor=shift, use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    ).eval()  # fmt: skip


def prompted_flux():
    import diffusers

    clip, clip_tok = _clip(None)
    t5, t5_tok = _t5(EMBED)
    torch.manual_seed(0)
    tr = _jitter(diffusers.FluxTransformer2DModel(
        in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=EMBED, pooled_projection_dim=HIDDEN, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ))  # fmt: skip
    return diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flux_vae(),
                                  text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
                                  transformer=tr)  # fmt: skip


def prompted_flux2():
    import diffusers

    te, tok = _mistral3()
    torch.manual_seed(0)
    tr = _flux2_transformer(True, in_channels=32, joint=3 * HIDDEN)
    return diffusers.Flux2Pipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                   vae=_flux2_vae(8), text_encoder=te, tokenizer=tok, transformer=tr)  # fmt: skip


def prompted_flux2_klein():
    import diffusers

    te, tok = _qwen3(27)
    torch.manual_seed(0)
    tr = _flux2_transformer(False, in_channels=32, joint=3 * HIDDEN)
    return diffusers.Flux2KleinPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=_flux2_vae(8), text_encoder=te, tokenizer=tok, transformer=tr,
                                        is_distilled=True)  # fmt: skip


def prompted_qwenimage():
    import diffusers

    te, tok = _qwen25vl()
    torch.manual_seed(0)
    tr = _jitter(diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=HIDDEN, axes_dims_rope=(4, 6, 6),
    ))  # fmt: skip
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=16, num_res_blocks=1).eval()
    return diffusers.QwenImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                       text_encoder=te, tokenizer=tok, transformer=tr)  # fmt: skip


def prompted_sd3():
    import diffusers

    (clip1, tok1), (clip2, tok2) = _clip(8), _clip(8, hidden=24)
    t5, t5_tok = _t5(EMBED)  # the CLIP states (16 + 24 wide) are padded to T5's width
    torch.manual_seed(0)
    tr = _jitter(diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=EMBED, caption_projection_dim=32, pooled_projection_dim=16,
        pos_embed_max_size=16,
    ))  # fmt: skip
    return diffusers.StableDiffusion3Pipeline(
        transformer=tr, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_kl_vae(16, 1.5305, 0.0609), text_encoder=clip1, tokenizer=tok1, text_encoder_2=clip2, tokenizer_2=tok2,
        text_encoder_3=t5, tokenizer_3=t5_tok,
    )  # fmt: skip


def prompted_sdxl():
    import diffusers

    (clip1, tok1), (clip2, tok2) = _clip(None), _clip(8, hidden=24)
    torch.manual_seed(0)
    unet = _jitter(diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=HIDDEN + 24,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 8,
        norm_num_groups=32,
    ), 0.02)  # fmt: skip
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             timestep_spacing="leading", steps_offset=1)  # fmt: skip
    return diffusers.StableDiffusionXLPipeline(vae=_kl_vae(4, 0.13025, None, quant_conv=True), text_encoder=clip1,
                                               tokenizer=tok1, text_encoder_2=clip2, tokenizer_2=tok2, unet=unet,
                                               scheduler=sched)  # fmt: skip


PROMPTED = {"FluxPipeline": prompted_flux, "Flux2Pipeline": prompted_flux2, "Flux2KleinPipeline": prompted_flux2_klein,
            "QwenImagePipeline": prompted_qwenimage, "StableDiffusion3Pipeline": prompted_sd3,
            "StableDiffusionXLPipeline": prompted_sdxl}  # fmt: skip
