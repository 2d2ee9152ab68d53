"""The optional `[torch]` extra: what needs torch (or timm, vit-pytorch) imports it through `require`.

Without torch every .npz / .safetensors / orbax / timm-folder flow reads and writes, and `.pth` files read
(zip archives: converters.formats.torch_pickle) and write (converters.formats.torch_zip). What needs torch
itself — torch's legacy (pre-1.6) format, `vit-flax parity`, `--bias-resize timm`, the demo — raises a
ConversionError in one line naming the extra to install, which the CLI prints with exit status 1.
"""
import importlib
import importlib.util

from .errors import ConversionError, first_line

# The distribution's name on the package index. `vit-flax` there is an unrelated 2020 project (0.0.3), so this one
# installs as `vit-flax-tools`; the import names (vit_flax, converters, vit_train) and the `vit-flax` command stay.
DISTRIBUTION = 'vit-flax-tools'
EXTRA = f"pip install '{DISTRIBUTION}[torch]'"


def require(module: str, what: str):
    """`importlib.import_module(module)`, or a ConversionError: '<what> needs torch, which is not installed
    here: pip install 'vit-flax-tools[torch]''. `module` may be dotted ('timm.layers'); the message names its top
    package, and says why when the package is installed but fails to import."""
    top = module.partition('.')[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        try:
            installed = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):   # sys.modules[top] = None (how a test hides a package) or a broken one
            installed = False
        why = f'which fails to import ({first_line(e)})' if installed else 'which is not installed here'
        raise ConversionError(f'{what} needs {top}, {why}: {EXTRA}') from None


def available(module: str) -> bool:
    """Whether `module` imports (the torch-free fallbacks choose by it)."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
