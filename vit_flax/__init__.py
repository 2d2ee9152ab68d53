from .registry import create_model, list_models, model_config, register
from . import vit  # noqa: F401  (registers the ViT/DeiT family)
from .vit import VisionTransformer
from .summary import count_params, count_macs, init_params, summarize

__all__ = ['create_model', 'list_models', 'model_config', 'register', 'VisionTransformer',
           'count_params', 'count_macs', 'init_params', 'summarize']
__version__ = '0.1.0'
