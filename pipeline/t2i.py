"""PixelDiT text-to-image: the sampler call the CLI, the job, the endpoint and the golden check share.

The official inference (facts from nv-tlabs/PiD `PixelDiTModel.generate_samples_from_batch`): Gaussian noise
[B, 3, H, W] from the seed, the caption embedding and the negative prompt's embedding (computed once) as the
unconditional branch, multistep DPM-Solver++ (order 2, `time_uniform_flow` with the flow shift) on the velocity
prediction, classifier-free guidance on one [uncond; cond] batch, the sample clamped to [-1, 1].
Our noise comes from a CPU generator seeded per image (batch-independent, the same on every device); the official
script draws its batch from the CUDA generator, so seeds do not give the official script's exact images.
"""

from __future__ import annotations

import torch

from pipeline.generate_options import GEN_OVERRIDES, MAX_PROMPT_CHARS, MAX_STEPS, GenerateOptions, row_options
from pipeline.model.t2i_sampler import dpm_solver_pp


def check_prompt(prompt) -> str:
    """A row's prompt, or BadInput: empty, or longer than MAX_PROMPT_CHARS."""
    from pipeline.errors import BadInput

    if not isinstance(prompt, str) or not prompt.strip():
        raise BadInput("empty prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadInput(f"prompt is {len(prompt)} characters, over the limit of {MAX_PROMPT_CHARS}")
    if not _is_text(prompt):
        raise BadInput("prompt is not valid text (it holds a lone UTF-16 surrogate)")
    return prompt


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@torch.inference_mode()
def generate(net, y: torch.Tensor, y_null: torch.Tensor | None, noise: torch.Tensor, *, steps: int, shift: float,
             cfg_scale: float, order: int = 2, should_stop=None) -> torch.Tensor:  # fmt: skip
    """noise [B, 3, H, W]; y [B, L, D]; y_null [1 or B, L, D] (needed when cfg_scale != 1) -> images in [-1, 1]."""
    B = noise.shape[0]
    dtype = next(net.parameters()).dtype
    if cfg_scale != 1.0:
        if y_null is None:
            raise ValueError("classifier-free guidance needs the negative (unconditional) embedding")
        y = torch.cat([y_null.expand(B, -1, -1), y])  # one batch [uncond; cond], as the official wrapper
    y = y.to(noise.device, dtype)

    def velocity(x, t):
        return net(x.to(dtype), t.to(dtype), y).float()

    out = dpm_solver_pp(
        velocity, noise.float(), steps=steps, shift=shift, cfg_scale=cfg_scale, order=order, should_stop=should_stop
    )
    return out.clamp(-1, 1)


def initial_noise(seed: int, hw: tuple[int, int], device="cpu") -> torch.Tensor:
    """[1, 3, H, W] from the image's own seed: the same image whatever it is batched with, on any device."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(1, 3, *hw, generator=g).to(device)


__all__ = ["GEN_OVERRIDES", "MAX_PROMPT_CHARS", "MAX_STEPS", "GenerateOptions", "check_prompt", "generate",
           "initial_noise", "row_options"]  # fmt: skip
