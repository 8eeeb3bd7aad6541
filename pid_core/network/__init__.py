"""The PiD network: PixelDiT body + latent adapter."""

from .config import PidConfig
from .pid_net import PidNet

__all__ = ["PidConfig", "PidNet"]
