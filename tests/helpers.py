"""Helpers shared by the tests (import them `from helpers import ...`; pytest's `pythonpath` puts tests/ first).

conftest.py keeps only fixtures and the session's settings; everything a test calls lives here. torch is
imported by the helpers that use it, so that a torch-free test can import this module (`make test-lean`).
"""
import contextlib
import io
import subprocess
import sys

import jax
import numpy as np


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def assert_ranks_as(order, want, ties: float, what=''):
    """`order` (class indices, best first: a top-k, or an argmax as a 1-list) ranks the classes as the scores
    `want` (computed by another library: torch against XLA) do, up to near ties. The two agree to a tolerance,
    not bit for bit (their kernels, picked per CPU instruction set, round differently), so two classes whose
    `want` scores are within `ties` (twice the value tolerance the test allows) may come in either order on
    some CPU; any other swap, a repeated class, or a class left out that beats one kept, fails."""
    order, w = [int(i) for i in order], np.asarray(want, np.float64)
    assert len(set(order)) == len(order) and all(0 <= i < len(w) for i in order), (what, order)
    got = w[order]
    assert np.all(np.diff(got) <= ties), (what, order, got)                 # best first, up to near ties
    rest = np.delete(w, order)
    assert not rest.size or rest.max() <= got[-1] + ties, (what, order, w)  # nothing left out beats the last


# ---------------------------------------------------------------- weights moved off their init

def perturb(params_or_model, seed=0, scale=0.05):
    """Flax params with every leaf moved off its init (norms off 1, biases and heads off 0), so that no 1s or
    0s are left to hide a bad map: N(0, scale) noise added to each leaf, drawn by numpy from `seed` (an
    op-by-op jax.random per leaf would compile for each shape). Takes a params tree (nested or flat dict,
    same structure back) or a Flax model, whose starting values are `init_like(model, seed)` (drawn on its
    shapes: no init to compile)."""
    import flax.linen as nn
    params = init_like(params_or_model, seed) if isinstance(params_or_model, nn.Module) else params_or_model
    rng = np.random.default_rng(seed)

    def move(leaf):
        leaf = np.asarray(leaf)
        return (leaf + scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    return jax.tree_util.tree_map(move, params)


def init_like(model, seed=0):
    """Params of a Flax model drawn by numpy on its shapes (`jax.eval_shape` of its init, nothing compiled),
    as an init draws them: kernels N(0, 1/fan_in) (Flax's lecun_normal; fan_in the product of all but the
    last axis), norm scales 1, every other leaf 0. Compiling a model's real init costs far more than its
    forward here (a one-stage 32 px Swin V2: ~7x, 23 s against 3 s on a loaded 2-core machine; threefry's rounds),
    and a test needs values in an init's range, not its exact draws (those tests call vit_flax.init_params)."""
    from vit_flax.summary import param_shapes
    rng = np.random.default_rng(seed + 7919)   # not the stream perturb() draws its noise from

    def draw(path, s):
        name = getattr(path[-1], 'key', str(path[-1]))
        if name == 'kernel' and len(s.shape) >= 2:
            fan_in = int(np.prod(s.shape[:-1]))
            return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(s.dtype)
        return (np.ones if name == 'scale' else np.zeros)(s.shape, s.dtype)
    return jax.tree_util.tree_map_with_path(draw, param_shapes(model))


def perturb_timm(model, seed=0, scale=0.02):
    """A torch module (timm's or any other) with every parameter moved off its init: norms off 1, biases and
    heads off 0; N(0, scale) from a torch.Generator seeded with `seed`. Returns the module in eval mode."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


# ---------------------------------------------------------------- timm models and running them

def timm_model(name, seed=0, **kw):
    import timm
    return perturb_timm(timm.create_model(name, pretrained=False, **kw), seed)


def state_np(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run_timm(model, x_nhwc):
    import torch
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


def run_flax(model, params, x, **kw):
    return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x, **kw))(params, x))


# ---------------------------------------------------------------- Hugging Face transformers models

def hf_model(cls_name: str, config_name: str, seed=0, **config):
    """transformers' `cls_name` built from `config_name(**config)` (a tiny config), every parameter moved off
    its init by a seeded randn * 0.02 (`perturb_timm`), in eval mode."""
    import torch
    import transformers
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(getattr(transformers, config_name)(**config))
    return perturb_timm(model, seed)


def hf_output(model, x_nhwc, field: str):
    """One output of a transformers vision model (`logits`, `pooler_output`, `image_embeds`,
    `last_hidden_state`; `image_features`: a full CLIPModel's projected embedding) on NHWC images, as numpy."""
    import torch
    pixels = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        if field == 'image_features':
            out = model.get_image_features(pixel_values=pixels)
            return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()
        if hasattr(model, 'vision_model') and hasattr(model, 'text_model'):   # a full CLIP / SigLIP: its tower
            return getattr(model.vision_model(pixel_values=pixels), field).numpy()
        return getattr(model(pixel_values=pixels), field).numpy()


def hf_strict_load(cls_name: str, folder):
    """`cls_name.from_pretrained(folder)` and its loading info, asserted free of missing, unexpected and
    mismatched keys."""
    import transformers
    model, info = getattr(transformers, cls_name).from_pretrained(str(folder), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != 'error_msgs'}
    assert not bad and not info.get('error_msgs'), bad
    return model.eval()


# ---------------------------------------------------------------- the `vit-flax` command

CLI = [sys.executable, '-m', 'vit_flax_cli']


def cli(*args) -> subprocess.CompletedProcess:
    """`vit-flax ARGS` in this process (a real process costs seconds of start-up): its exit status, stdout and
    stderr as a CompletedProcess. argparse's exits (bad usage: 2, --help: 0) become the return code; any
    other exception (`--debug`) propagates."""
    from vit_flax_cli.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


def cli_process(*args, wait=True, **kw):
    """`vit-flax ARGS` as a separate process, started as a user starts it, for what only a process shows: the
    entry point's exit path, kills and signals, closed pipes, another environment (`env=`). Text mode unless
    `text=False`; other keywords go to subprocess. wait=True: the finished CompletedProcess (stdout, stderr
    captured); wait=False: the running Popen, stdout and stderr piped."""
    kw.setdefault('text', True)
    argv = [*CLI, *map(str, args)]
    if wait:
        return subprocess.run(argv, capture_output=True, **kw)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


# ---------------------------------------------------------------- without torch

@contextlib.contextmanager
def hidden(*packages):
    """Within the block, `import torch` (and each of `packages` and their submodules) raises ImportError as
    it does where the package is not installed (`sys.modules[name] = None`); the modules come back after.
    What imported torch before the block keeps its reference: this checks the imports made inside it."""
    saved = {n: m for n, m in sys.modules.items() if n.partition('.')[0] in packages}
    try:
        for n in saved:
            del sys.modules[n]
        for p in packages:
            sys.modules[p] = None
        yield
    finally:
        for p in packages:
            sys.modules.pop(p, None)
        sys.modules.update(saved)


WITHOUT_TORCH = ('torch', 'timm', 'torchvision', 'vit_pytorch')


# ---------------------------------------------------------------- a Hugging Face cache, offline

def fake_hub(cache, folder, repo='timm/vit_tiny_patch16_224.fake_tag', commit='a' * 40, refs=('main',), only=None):
    """`cache` (an HF_HUB_CACHE) holding `folder`'s files as a snapshot of `repo`, laid out as huggingface_hub
    lays it out: `models--ORG--NAME/blobs/<sha256>`, `snapshots/<commit>/<file>` symlinks to the blobs,
    `refs/<branch>` holding the commit for each of `refs`. `only`: the files of `folder` to cache (a partial
    download). Returns the repo name."""
    import hashlib
    import os
    import shutil
    root = os.path.join(str(cache), 'models--' + repo.replace('/', '--'))
    snap = os.path.join(root, 'snapshots', commit)
    for d in (snap, os.path.join(root, 'blobs'), os.path.join(root, 'refs')):
        os.makedirs(d, exist_ok=True)
    for ref in refs:
        with open(os.path.join(root, 'refs', ref), 'w') as f:
            f.write(commit)   # huggingface_hub writes no newline
    for name in sorted(os.listdir(folder)) if only is None else only:
        with open(os.path.join(folder, name), 'rb') as f:
            blob = os.path.join(root, 'blobs', hashlib.sha256(f.read()).hexdigest())
        shutil.copy(os.path.join(folder, name), blob)
        link = os.path.join(snap, name)
        if not os.path.lexists(link):
            os.symlink(os.path.relpath(blob, snap), link)
    return repo


# ---------------------------------------------------------------- transformers' ViT and its former Flax files

HF_VIT_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=32,
                   patch_size=8)
_NAMES = {'q_proj': 'attention/attention/query', 'k_proj': 'attention/attention/key',
          'v_proj': 'attention/attention/value', 'o_proj': 'attention/output/dense',
          'layernorm_before': 'layernorm_before', 'layernorm_after': 'layernorm_after',
          'mlp.fc1': 'intermediate/dense', 'mlp.fc2': 'output/dense'}


def hf_vit(cls='ViTModel', seed=0, **cfg):
    """A perturbed transformers ViT (`cls`) of HF_VIT_TINY's sizes (`cfg` on top), and its ViTConfig."""
    import torch
    import transformers
    config = transformers.ViTConfig(**{**HF_VIT_TINY, **cfg})
    torch.manual_seed(seed)
    return perturb_timm(getattr(transformers, cls)(config), seed), config


def flax_vit_tree(model) -> dict:
    """The nested params transformers' FlaxViTModel (FlaxViTForImageClassification: under `vit`, beside
    `classifier`) holds for a torch ViT's weights (transformers 5's own key spelling: layers.i.attention.q_proj,
    mlp.fc1): kernel = weight.T, conv kernel (p,p,C,D) = weight.permute(2,3,1,0), q/k/v kernels (D, heads*hd)."""
    tree = {}

    def put(path, v):
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(v, np.float32)

    for k, t in model.state_dict().items():
        v = t.detach().numpy()
        pre, k = (('vit',), k[4:]) if k.startswith('vit.') else ((), k)
        *mod, leaf = k.split('.')
        mod = '.'.join(mod)
        if leaf == 'weight':
            leaf = 'scale' if v.ndim == 1 else 'kernel'
            v = v.transpose(2, 3, 1, 0) if v.ndim == 4 else v.T if v.ndim == 2 else v
        if mod.startswith('layers.'):
            _, i, rest = mod.split('.', 2)
            path = ('encoder', 'layer', i, *_NAMES[rest.replace('attention.', '')].split('/'))
        elif mod == 'embeddings':
            path = ('embeddings',)
        else:
            path = tuple(mod.split('.'))
        put(pre + path + (leaf,), v)
    return tree


def write_hf_flax(model, config, folder, name='flax_model.msgpack', with_config=True):
    """`folder/name`: `flax_vit_tree(model)` as HF's Flax save_pretrained wrote it (msgpack), config.json beside."""
    import os
    from flax.serialization import msgpack_serialize
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), 'wb') as f:
        f.write(msgpack_serialize(flax_vit_tree(model)))
    if with_config:
        config.to_json_file(os.path.join(folder, 'config.json'))
    return os.path.join(folder, name)


def run_hf(model, x_nhwc, out):
    """transformers' model output `out` ('logits', 'pooler_output', ...) on NHWC images, as numpy."""
    import torch
    with torch.no_grad():
        return getattr(model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()), out).numpy()


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a process the test starts with `devices` CPU devices: this process's flags (those
    tests/conftest.py sets, or the user's) with the device count replaced, so that it compiles as they do."""
    import os
    keep = [f for f in os.environ.get('XLA_FLAGS', '').split()
            if not f.startswith('--xla_force_host_platform_device_count')]
    return ' '.join(keep + [f'--xla_force_host_platform_device_count={devices}'])


def kill_9_after_checkpoint(cmd, env, workdir, step: int, cwd=None, timeout: float = 600) -> None:
    """Start `cmd` (a training run writing to `workdir`), wait until its checkpoint of `step` is committed
    (orbax's _CHECKPOINT_METADATA), then SIGKILL it: the kill -9 of the resume tests. Fails when the run ends
    first."""
    import os
    import signal
    import time
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(str(workdir), 'checkpoints', str(step), '_CHECKPOINT_METADATA')
    deadline = time.time() + timeout
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, 'the run ended before it could be killed'
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
