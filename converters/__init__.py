"""Checkpoint I/O and parameter maps: Google npz layouts <-> Flax tree <-> PyTorch (timm, Microsoft Swin)."""
from .api import adapt, load_model, load_params, read_checkpoint, save_params, write_flat
from .errors import ConversionError

__all__ = ['adapt', 'load_model', 'load_params', 'read_checkpoint', 'save_params', 'write_flat', 'ConversionError']
