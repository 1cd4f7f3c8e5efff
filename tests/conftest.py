import os
from pathlib import Path

# Triton kernels run in the CPU interpreter in tests; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT.parent / "shared" / "golden"

# Two cores: keep torch from oversubscribing when Ray workers run beside the test process.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden fixtures not found at {GOLDEN}")
    return GOLDEN


def tiny_config(**kw):
    """A small PiD config (v1 layout) for fast tests."""
    from pipeline.model.config import PidConfig

    base = dict(
        hidden_size=32, num_groups=2, pixel_hidden_size=4, pixel_attn_hidden_size=16, pixel_num_groups=2,
        patch_depth=2, pixel_depth=1, patch_size=8, txt_embed_dim=8, txt_max_length=4, lq_latent_channels=4,
        lq_hidden_dim=8, lq_num_res_blocks=1, lq_interval=1, sr_scale=2, latent_spatial_down_factor=4,
    )  # fmt: skip
    base.update(kw)
    return PidConfig(**base)


def random_net(cfg, seed=0):
    from pipeline.model.network import PidNet

    torch.manual_seed(seed)
    net = PidNet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval()


@pytest.fixture(scope="session")
def bicubic_weights(tmp_path_factory):
    """The `small` preset at its training initialisation: zero output layer, so it returns bicubic exactly.

    Deterministic and content-preserving, which is what I/O and tiling-geometry tests need; tests of
    upscaling quality use the bundled trained model instead.
    """
    from jobs.train_small import init_weights
    from pipeline.model.loading import save_safetensors
    from pipeline.model.network import PidNet
    from pipeline.model.presets import get_preset

    cfg = get_preset("small").config
    torch.manual_seed(0)
    net = PidNet(cfg)
    init_weights(net)
    path = tmp_path_factory.mktemp("w") / "small_init.safetensors"
    save_safetensors(net, path, cfg)
    return str(path)


def png_bytes(img, fmt="PNG", **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


S3_CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs for the module's tests, shut down after them."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto's server mode) on 127.0.0.1; returns its endpoint URL."""
    from moto.server import ThreadedMotoServer

    os.environ.update(S3_CREDS)  # boto3 in this process and in Ray workers started after this
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


WORDS = "a cat sleeping on warm sunny windowsill busy city street dog red flowers the of and in".split()


def make_tiny_gemma(d):
    """A tiny random Gemma-2 with a small word-level tokenizer, saved like the hub's folder (the caption encoder's
    real classes; nothing downloads). Hidden size 16."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

    from pipeline.encoders.text import CHI_PROMPT

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in WORDS + sorted(set(CHI_PROMPT.replace("\n", " ").split())):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")  # fmt: skip
    cfg = Gemma2Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                       sliding_window=64, pad_token_id=0, bos_token_id=2, eos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    model = Gemma2Model(cfg).eval()
    fast.save_pretrained(d)
    model.save_pretrained(d)
    return d


def make_tiny_t2i(d, cfg_scale: float = 3.0):
    """A tiny random PixelDiT (PiD's network without its LQ branch) saved as our safetensors, and a preset file that
    names it: task t2i, the tiny Gemma's width, 3 steps at 32x48 by default."""
    import json

    import torch

    from pipeline.model.config import PidConfig
    from pipeline.model.loading import save_safetensors
    from pipeline.model.network import PidNet
    from pipeline.model.presets import Preset

    cfg = PidConfig(hidden_size=64, num_groups=4, pixel_hidden_size=8, pixel_attn_hidden_size=48, pixel_num_groups=4,
                    patch_depth=3, pixel_depth=2, patch_size=16, txt_embed_dim=16, txt_max_length=12,
                    rope_mode="original", lq_in_channels=0, lq_latent_channels=0, lq_interval=1)  # fmt: skip
    torch.manual_seed(0)
    net = PidNet(cfg)
    with torch.no_grad():  # zero-initialised output layers would make every image the same
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_safetensors(net, d / "net.safetensors", cfg)
    preset = Preset("tiny-t2i", cfg, str(d / "net.safetensors"), "none", "t2i", None, task="t2i", envelope=(32, 64),
                    t2i={"steps": 3, "shift": 4.0, "cfg_scale": cfg_scale, "size": [32, 48],
                         "negative_prompt": "blurry"})  # fmt: skip
    (d / "preset.json").write_text(json.dumps(preset.describe()))
    return d / "preset.json"


def make_tiny_zimage(d):
    """A tiny random diffusers ZImagePipeline (its real classes: ZImageTransformer2DModel, a Qwen3 text encoder with
    a word-level tokenizer and a chat template, Flux's VAE layout with its scaling/shift, the flow scheduler), saved
    as a diffusers folder. Nothing downloads."""
    import diffusers
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS + "user assistant <|im_start|> <|im_end|>".split():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")  # fmt: skip
    te = Qwen3Model(Qwen3Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                max_position_embeddings=128)).eval()  # fmt: skip
    tr = diffusers.ZImageTransformer2DModel(
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[4, 6, 6],
        axes_lens=[64, 32, 32],
    )
    with torch.no_grad():  # zero-initialised output layers would give a zero latent
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False,
    )  # fmt: skip
    pipe = diffusers.ZImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=te, tokenizer=fast, transformer=tr)  # fmt: skip
    pipe.save_pretrained(str(d), safe_serialization=True)
    return d


def wait_healthy(url: str, seconds: float = 180) -> None:
    """Poll the endpoint's /healthz until it answers 200 (replicas loaded) or the time is up."""
    import time

    import requests

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)


def endpoint_stand_ins(d, golden_dir):
    """The models of the endpoint tests, under `d`: a Flux-layout PiD stand-in as a preset file (so Serve's replicas
    load it too), a tiny PixelDiT preset and a tiny Gemma. Returns (pid ModelOptions, t2i preset path, Gemma folder)."""
    from test_encoders import build_stand_in

    from pipeline.runtime import ModelOptions

    build_stand_in("flux-2k", golden_dir, d / "flux")
    t2i, gemma = make_tiny_t2i(d), make_tiny_gemma(d / "gemma")
    return ModelOptions(str(d / "flux" / "preset.json"), weights=str(d / "flux")), t2i, gemma
