"""LQ encoders (VAE latents, RGB) and the caption encoder."""
