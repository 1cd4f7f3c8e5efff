"""pidray: NVIDIA PiD (pixel diffusion decoder) upscaling, in stages that Ray Data and Ray Serve both run."""

__version__ = "0.1.0"
