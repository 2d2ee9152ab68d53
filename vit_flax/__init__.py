"""Vision Transformers (ViT, DeiT, Swin V1/V2) and MLP-Mixers in JAX/Flax with Google's parameter trees and timm's names.

`models/` holds one module per family (importing it registers its names), `ops/` the fast paths beside
their references."""
from .errors import ModelConfigError
from .registry import UnknownModelError, UnknownOptionError, create_model, list_models, model_config, register
from .models.vit import VisionTransformer  # registers ViT/DeiT, R+ViT hybrids, SigLIP towers
from .models import vit_timm  # registers timm's other ViTs: DINOv2, DeiT III, CLIP, FlexiViT, AIMv2, ...
from .models.swin import SwinTransformer  # registers the Swin family (V1, Swin-S3)
from .models.swinv2 import SwinTransformerV2  # registers timm's swinv2_* names
from .models.swinv2_cr import SwinTransformerV2Cr  # registers timm's swinv2_cr_* names
from .models.vit_pytorch import LucidViT  # registers lucidrains' vit-pytorch ViT
from .models.mixer import MlpMixer  # registers timm's mlp_mixer names: MLP-Mixer, gMixer, ResMLP, gMLP
from .models.eva import Eva  # registers timm's eva.py: EVA/EVA-02, DINOv3, PE, RoPE-ViT, LingBot, Sapiens2
from .models.beit import Beit  # registers timm's beit.py: BEiT, BEiT v2
from .models.relpos import VisionTransformerRelPos  # registers timm's vision_transformer_relpos names
from .models.cait import Cait  # registers timm's cait.py: CaiT
from .models.naflex import NaFlexVit  # registers timm's naflexvit names (SigLIP 2 NaFlex, C-RADIO)
from .summary import count_params, count_macs, init_params, summarize

__all__ = ['create_model', 'list_models', 'model_config', 'register', 'ModelConfigError', 'UnknownModelError',
           'UnknownOptionError', 'VisionTransformer', 'SwinTransformer', 'SwinTransformerV2',
           'SwinTransformerV2Cr', 'LucidViT', 'Eva', 'Beit', 'Cait', 'MlpMixer', 'NaFlexVit', 'VisionTransformerRelPos',
           'count_params', 'count_macs', 'init_params', 'summarize']
__version__ = '0.1.0'


def __getattr__(name):
    """`vit_flax.nnx` on first use (flax.nnx is not imported by `import vit_flax`: +0.2 s)."""
    if name == 'nnx':
        import importlib
        return importlib.import_module('.nnx', __name__)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
