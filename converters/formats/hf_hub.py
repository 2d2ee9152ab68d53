"""`hf-hub:ORG/NAME[@REVISION]`: a Hugging Face Hub repo as a local folder, through huggingface_hub.

timm repos (`config.json` with `architecture` + `model.safetensors`) and transformers repos (`config.json` with
`model_type` + weights) alike. Only what a conversion reads is fetched (`snapshot_download(allow_patterns=...)`):

    config.json, preprocessor_config.json          when the repo has them
    the weights, the first of:  model.safetensors | model.safetensors.index.json + its shards |
                                pytorch_model.bin | pytorch_model.bin.index.json + its shards |
                                timm's pytorch_model.pth, model.pth | flax_model.msgpack |
                                open_clip_model.safetensors | open_clip_pytorch_model.bin (+ open_clip_config.json)

Online, the repo's file list (one API call) picks the files, and huggingface_hub downloads them into its cache
with its own progress bars (`HF_HUB_DISABLE_PROGRESS_BARS=1` silences them) and its own token (`HF_TOKEN`,
`hf auth login`). Offline (`HF_HUB_OFFLINE=1`, or the Hub unreachable) the cached snapshot is read as it is:
`refs/REVISION` names the commit, or REVISION is the commit. The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`,
else `~/.cache/huggingface/hub`, read from the environment at each call (huggingface_hub reads it once, at import).

huggingface_hub is imported here only, when a name is resolved: `vit_flax` and the readers never import it.
"""
import fnmatch
import os
import re
from typing import List, Optional, Sequence, Tuple

from ..errors import ConversionError, first_line

HF_HUB = 'hf-hub:'
CONFIG = 'config.json'
PREPROCESSOR = 'preprocessor_config.json'
OPEN_CLIP_CONFIG = 'open_clip_config.json'
# (the file, or an index and the pattern of its shards), in order of preference
WEIGHTS: Tuple[Tuple[str, Optional[str]], ...] = (
    ('model.safetensors', None),
    ('model.safetensors.index.json', 'model-*-of-*.safetensors'),
    ('pytorch_model.bin', None),
    ('pytorch_model.bin.index.json', 'pytorch_model-*-of-*.bin'),
    ('pytorch_model.pth', None),
    ('model.pth', None),
    ('flax_model.msgpack', None),
    ('open_clip_model.safetensors', None),
    ('open_clip_pytorch_model.bin', None),
)
OPEN_CLIP_WEIGHTS = ('open_clip_model.safetensors', 'open_clip_pytorch_model.bin')
_REPO = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$')
_TRUE = ('1', 'ON', 'YES', 'TRUE')


def cache_dir() -> str:
    """Where huggingface_hub keeps its cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get('HF_HUB_CACHE') or os.environ.get('HUGGINGFACE_HUB_CACHE'):
        return os.environ.get('HF_HUB_CACHE') or os.environ['HUGGINGFACE_HUB_CACHE']
    home = os.environ.get('HF_HOME') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'huggingface')
    return os.path.join(home, 'hub')


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set now, or when huggingface_hub was imported."""
    if any((os.environ.get(k) or '').upper() in _TRUE for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE')):
        return True
    import huggingface_hub.constants as c
    return bool(c.HF_HUB_OFFLINE)


def parse(spec: str) -> Tuple[str, str]:
    """(repo, revision) of `hf-hub:ORG/NAME[@REVISION]` (revision 'main' by default)."""
    repo, _, rev = spec[len(HF_HUB):].partition('@')
    rev = rev or 'main'
    if not _REPO.match(repo) or '..' in repo or '..' in rev or rev.startswith(('.', '/')) or '\\' in rev:
        raise ConversionError(f'{spec}: expected hf-hub:ORG/NAME[@REVISION], '
                              f'e.g. hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k')
    return repo, rev


def wanted(files: Sequence[str]) -> List[str]:
    """The files of a repo listing (paths relative to its root) that a conversion reads; [] when it holds
    no weights vit-flax reads."""
    have = set(files)
    for name, shards in WEIGHTS:
        if name in have:
            weights = [name] + sorted(f for f in have if shards and fnmatch.fnmatchcase(f, shards) and '/' not in f)
            break
    else:
        return []
    extra = [CONFIG, PREPROCESSOR] + ([OPEN_CLIP_CONFIG] if name in OPEN_CLIP_WEIGHTS else [])
    return [f for f in extra if f in have] + weights


def listing(folder: str) -> List[str]:
    """Every file below `folder` (a snapshot), as paths relative to it with '/' separators."""
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder).replace(os.sep, '/') for n in names]
    return out


def _fetch_hint(repo: str, rev: str) -> str:
    return f'`hf download {repo}' + (f' --revision {rev}`' if rev != 'main' else '`')   # huggingface_hub's CLI


def resolve(spec: str, log=None) -> str:
    """`hf-hub:ORG/NAME[@REV]` -> the local snapshot folder holding what `wanted` picks (downloaded when online).

    Errors are one line naming the repo and revision: a repo or revision the Hub does not have, a gated repo
    without a token, a repo not in the cache offline, a repo holding no weights vit-flax reads."""
    repo, rev = parse(spec)
    from ..optional import require
    hub = require('huggingface_hub', 'hf-hub: names')
    from huggingface_hub import errors as hub_errors
    cache = cache_dir()
    local = offline()
    files, why_local = None, 'HF_HUB_OFFLINE is set' if local else None
    if not local:
        try:
            files = hub.HfApi().list_repo_files(repo, revision=rev)
        except hub_errors.GatedRepoError:
            raise ConversionError(f'{spec}: {repo} is gated: accept its terms on huggingface.co and log in '
                                  f'(`hf auth login`, or set HF_TOKEN)') from None
        except hub_errors.RevisionNotFoundError:
            raise ConversionError(f'{spec}: the Hub has no revision {rev!r} of {repo}') from None
        except hub_errors.RepositoryNotFoundError:
            raise ConversionError(f'{spec}: the Hub has no repo {repo} (or it is private: log in with '
                                  f'`hf auth login`, or set HF_TOKEN)') from None
        except (OSError, ValueError) as e:   # no connection, the Hub down: the cache may hold it
            why_local = f'the Hub cannot be reached ({type(e).__name__}: {first_line(e)})'
    try:
        if files is None:
            snap = hub.snapshot_download(repo, revision=rev, cache_dir=cache, local_files_only=True)
            files = listing(snap)
        patterns = wanted(files)
        if not patterns:
            shown = ', '.join(sorted(files)[:8]) or 'nothing'
            raise ConversionError(f'{spec}: {repo} holds no weights vit-flax reads (looked for '
                                  f'{", ".join(n for n, _ in WEIGHTS)}; it has {shown})')
        if log is not None and not why_local:
            log(f'{spec}: {", ".join(patterns)}')
        return hub.snapshot_download(repo, revision=rev, cache_dir=cache, allow_patterns=patterns,
                                     local_files_only=why_local is not None)
    except ConversionError:
        raise
    except hub_errors.LocalEntryNotFoundError:
        raise ConversionError(f'{spec}: not in the local Hugging Face cache ({cache}) and {why_local}: fetch it '
                              f'where there is network ({_fetch_hint(repo, rev)}) or set HF_HOME/HF_HUB_CACHE to '
                              f'a cache that holds it') from None
    except (OSError, ValueError) as e:
        raise ConversionError(f'{spec}: cannot fetch {repo}@{rev} ({type(e).__name__}: {first_line(e)})') from None
