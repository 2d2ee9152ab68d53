"""Vision Transformers (ViT, DeiT, Swin) in JAX/Flax with Google's parameter trees and timm's names."""
from .registry import create_model, list_models, model_config, register
from .models import vit  # noqa: F401  (registers the ViT/DeiT family)
from .models.vit import VisionTransformer
from .models import vit_google  # noqa: F401  (R+ViT hybrids, SigLIP towers: timm's names)
from .models import swin  # noqa: F401  (registers the Swin family)
from .models.swin import SwinTransformer
from .models import vit_pytorch  # noqa: F401  (registers lucidrains' vit-pytorch ViT)
from .models.vit_pytorch import LucidViT
from .summary import count_params, count_macs, init_params, summarize

__all__ = ['create_model', 'list_models', 'model_config', 'register', 'VisionTransformer', 'SwinTransformer',
           'LucidViT', 'count_params', 'count_macs', 'init_params', 'summarize']
__version__ = '0.1.0'
