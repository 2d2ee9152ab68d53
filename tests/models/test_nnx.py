"""vit_flax.nnx: the NNX face computes the linen model's function on the linen model's tree."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

import converters
import vit_flax
import vit_flax.nnx as vnnx
from helpers import images, perturb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tiny members of the families: ViT (Google's tree), a DINOv2 with registers (LayerScale, registers, no class
# position), Swin and Swin V2 CR (timm's names; CR's meta-MLP dropout), vit-pytorch (its own), ResMLP (the
# MLP-Mixer family: Affine, LayerScale), a DINOv3 (the Eva family: RoPE, storage tokens), a BEiT (relative
# position bias per block), a ViT-RelPos (a class token, the relative position MLP), a CaiT (talking heads,
# class attention) and a NaFlex ViT (its position table resized per image)
TINY = [
    ('vit_tiny_patch16_224', dict(img_size=32, depth=1, num_classes=5)),
    ('vit_small_patch14_reg4_dinov2', dict(img_size=28, depth=1, num_classes=5)),
    ('swin_tiny_patch4_window7_224', dict(img_size=32, depths=(2,), num_heads=(3,), window_size=4, num_classes=5)),
    ('swinv2_cr_tiny_224', dict(img_size=32, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, num_classes=5)),
    ('lucid_vit_tiny_patch16_224', dict(img_size=32, depth=1, num_classes=5)),
    ('resmlp_12_224', dict(img_size=32, patch_size=8, num_blocks=1, embed_dim=32, num_classes=5)),
    ('vit_small_patch16_dinov3', dict(img_size=32, depth=1, num_classes=5)),
    ('beit_base_patch16_224', dict(img_size=32, depth=1, embed_dim=64, num_heads=2, num_classes=5)),
    ('vit_relpos_base_patch16_clsgap_224', dict(img_size=32, depth=1, embed_dim=32, num_heads=2, num_classes=5)),
    ('cait_xxs24_224', dict(img_size=32, depth=1, depth_token_only=1, num_classes=5)),   # talking heads, class attention
    ('naflexvit_base_patch16_gap', dict(img_size=32, depth=1, embed_dim=32, num_heads=2, patch_size=8,
                                        pos_embed_grid_size=(4, 4), num_classes=5)),   # an image in, patches inside
]


def linen_logits(name, over, params, x):
    model = vit_flax.create_model(name, **over)
    return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(params, x))


@nnx.jit
def nnx_logits(model, x):
    return model(x, train=False)


# The NNX face is one bridge over every linen model: make test takes the ViT (Google's tree), the DINOv2 and
# DINOv3 (tokens without positions, RoPE) and a Swin; the other families' tiny members are `make test-slow`.
IN_MAKE_TEST = ('vit_tiny_patch16_224', 'vit_small_patch14_reg4_dinov2', 'swin_tiny_patch4_window7_224',
                'vit_small_patch16_dinov3')


@pytest.mark.parametrize('name,over', [
    pytest.param(n, o, marks=() if n in IN_MAKE_TEST else pytest.mark.slow,
                 id=n.split('_')[0] + ('-' + n.split('_')[-1] if 'dino' in n else '') + ('-relpos' if 'relpos' in n else '')
                 + ('-cr' if '_cr_' in n else ''))
    for n, o in TINY])
def test_nnx_model_holds_the_linen_tree_and_computes_the_linen_logits(name, over):
    params = perturb(vit_flax.create_model(name, **over), seed=1)
    model = vnnx.create_model(name, rngs=nnx.Rngs(0), **over)
    got = jax.tree.map(lambda a: a.shape, vnnx.params_of(model))
    assert got == jax.tree.map(lambda a: a.shape, params)          # the same names and shapes
    vnnx.load_params(model, params)
    x = images((2,) + tuple(model.to_nnx__module.input_shape))
    np.testing.assert_array_equal(np.asarray(nnx_logits(model, x)),
                                  linen_logits(name, over, params, x))


def test_default_init_is_the_linen_init_for_the_rngs_params_key():
    name, over = TINY[0]
    model = vnnx.create_model(name, rngs=nnx.Rngs(7), **over)
    ref = vit_flax.init_params(vit_flax.create_model(name, **over), nnx.Rngs(7).params())
    for a, b in zip(jax.tree.leaves(vnnx.params_of(model)), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_converted_checkpoint_loads_with_nnx_update_and_saves_back(tmp_path):
    name, over = TINY[0]
    params = perturb(vit_flax.create_model(name, **over), seed=2)
    path = str(tmp_path / 'vit.safetensors')
    converters.save_params(params, path, name, **over)
    loaded = converters.load_params(path, name, **over, log=lambda m: None)
    x = images((2, 32, 32, 3), seed=3)
    ref = linen_logits(name, over, params, x)

    by_update = vnnx.create_model(name, **over)
    nnx.update(by_update, loaded)                                  # nnx's own call, on the converter's tree
    by_helper = vnnx.create_model(name, params={'params': loaded}, **over)
    for m in (by_update, by_helper):
        np.testing.assert_array_equal(np.asarray(nnx_logits(m, x)), ref)
    back = str(tmp_path / 'back.npz')
    converters.save_params(vnnx.params_of(by_helper), back, name, **over)
    again = converters.load_params(back, name, **over, log=lambda m: None)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_params_names_the_leaf_that_does_not_fit():
    name, over = TINY[0]
    model = vnnx.create_model(name, **over)
    params = vnnx.params_of(model)
    with pytest.raises(ValueError, match=r"'head/kernel' has shape \(192, 3\), the model wants \(192, 5\)"):
        vnnx.load_params(model, dict(params, head=dict(kernel=np.zeros((192, 3)), bias=np.zeros(3))))
    with pytest.raises(ValueError, match=r"missing 'head/bias'"):
        vnnx.load_params(model, dict(params, head=dict(kernel=params['head']['kernel'])))
    flat = flatten_dict(params, sep='/')
    vnnx.load_params(model, flat)                                   # flat keys are read too


def test_a_few_nnx_optimizer_steps_lower_the_loss_and_dropout_draws_from_the_rngs():
    name, over = TINY[0]
    model = vnnx.create_model(name, rngs=nnx.Rngs(0, dropout=1), drop_rate=0.1, **over)
    vnnx.load_params(model, perturb(vit_flax.create_model(name, **over), seed=4))
    x, y = images((8, 32, 32, 3), seed=5), jnp.arange(8) % 5
    a, b = model(x, train=True), model(x, train=True)
    assert float(jnp.abs(a - b).max()) > 0                           # a fresh dropout key per call
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x, train=True), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss
    losses = [float(step(model, opt, x, y)) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1, losses

    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(np.asarray(nnx_logits(clone, x)), np.asarray(nnx_logits(model, x)))
    # the trained tree is still the linen model's: linen computes the same logits from it
    np.testing.assert_array_equal(np.asarray(nnx_logits(model, x)),
                                  linen_logits(name, dict(over, drop_rate=0.1), vnnx.params_of(model), x))


def test_import_vit_flax_does_not_import_flax_nnx_until_vit_flax_nnx_is_used():
    code = ('import sys, vit_flax; print("flax.nnx" in sys.modules); '
            'vit_flax.nnx.create_model; print("flax.nnx" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.split() == ['False', 'True']


def readme_nnx_example() -> str:
    with open(os.path.join(ROOT, 'docs', 'MODELS.md')) as f:   # the NNX section (the README's until issue 35)
        text = f.read()
    section = text.split('\n## NNX\n', 1)[1]
    return section.split('```python\n', 1)[1].split('```', 1)[0]


def test_the_readme_nnx_fine_tuning_example_runs_and_lowers_the_loss(tmp_path, monkeypatch, capsys):
    code = readme_nnx_example()
    line = "name, over = 'vit_tiny_patch16_224', dict(num_classes=10)"
    assert line in code
    tiny = dict(img_size=32, depth=1)                                  # the example's model, made tiny
    code = code.replace(line, f"name, over = 'vit_tiny_patch16_224', dict(num_classes=10, **{tiny!r})")
    monkeypatch.chdir(tmp_path)
    start = perturb(vit_flax.create_model('vit_tiny_patch16_224', **tiny), seed=6)   # a 1000-class "release"
    converters.save_params(start, 'ViT-Ti_16.npz', 'vit_tiny_patch16_224', **tiny)
    exec(compile(code, 'docs/MODELS.md', 'exec'), {})
    losses = [float(l.rsplit(' ', 1)[1]) for l in capsys.readouterr().out.splitlines() if l.startswith('step ')]
    assert len(losses) == 5 and losses[-1] < losses[0], losses
    tuned = converters.load_params('finetuned.safetensors', 'vit_tiny_patch16_224', num_classes=10, **tiny,
                                   log=lambda m: None)
    moved = flatten_dict(tuned, sep='/')
    kept = flatten_dict(start, sep='/')
    assert moved['embedding/kernel'].shape == kept['embedding/kernel'].shape
    assert not np.array_equal(np.asarray(moved['embedding/kernel']), kept['embedding/kernel'])   # it trained
    assert moved['head/kernel'].shape == (192, 10)


def test_one_model_state_loads_into_another():
    name, over = TINY[0]
    a = vnnx.create_model(name, rngs=nnx.Rngs(1), **over)
    b = vnnx.create_model(name, rngs=nnx.Rngs(2), **over)
    assert not np.array_equal(vnnx.params_of(a)['embedding']['kernel'], vnnx.params_of(b)['embedding']['kernel'])
    vnnx.load_params(b, nnx.state(a, nnx.Param))                     # an nnx State, not a dict
    for x, y in zip(jax.tree.leaves(vnnx.params_of(a)), jax.tree.leaves(vnnx.params_of(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
