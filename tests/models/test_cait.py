"""timm's `cait` module (CaiT: talking-heads self-attention, LayerScale, class-attention blocks), each registration
built here under timm's name and judged against timm itself: the names, input size, classes, depths, heads, LayerScale
start and parameter counts of all ten, and on reduced copies the logits both ways and the MACs against torch's
counter."""
import jax
import numpy as np
import pytest
import timm
import torch
from flax.traverse_util import unflatten_dict

import vit_flax
from converters import rules
from converters.families.cait import FAMILY
from vit_flax.errors import ModelConfigError
from vit_flax.models.cait import Cait

from helpers import images, perturb_timm, rel_err, run_timm, state_np

jax.config.update('jax_default_matmul_precision', 'highest')

TIMM_NAMES = sorted(timm.list_models(module='cait'))
# two self-attention blocks and the two class-attention blocks, width 48 (4 heads of 12), 32 px (16 tokens)
REDUCED = dict(depth=2, embed_dim=48, num_heads=4, img_size=32, patch_size=8, num_classes=10)


def timm_meta(name, **kw):
    with torch.device('meta'):
        return timm.create_model(name, pretrained=False, **kw)


def timm_entrypoint_args(name) -> dict:
    """What timm's registered function for `name` passes to its builder (patch, width, depth, heads, LayerScale
    start), called with the builder stubbed out: timm's own numbers, without building 24-48 blocks."""
    from unittest import mock
    with mock.patch('timm.models.cait._create_cait', lambda variant, pretrained=False, **kw: kw):
        return timm.models.cait.__dict__[name]()


def test_every_cait_registration_of_timm_is_built():
    ours = sorted(n for n in vit_flax.list_models() if vit_flax.model_config(n)[0] is Cait)
    assert ours == TIMM_NAMES and len(ours) == 10


def test_every_registration_has_timms_sizes_depths_heads_layer_scale_input_size_and_parameter_count():
    """Against timm's registered function and pretrained_cfg: patch, width, depth, heads, LayerScale's start, input
    size and classes; timm's class defaults for the rest (two class blocks, qkv bias, MLP ratios 4); and the
    parameter count of a one-block copy against timm's (meta device): the blocks being identical, equal counts at one
    block and equal depths are equal counts (the whole models: `test_full_model_parameter_count_equals_timms`)."""
    wrong = {}
    for name in TIMM_NAMES:
        model, args, cfg = vit_flax.create_model(name), timm_entrypoint_args(name), timm.models.get_pretrained_cfg(name)
        ours = (model.patch_size, model.embed_dim, model.depth, model.num_heads, model.init_values,
                (3, *model.input_shape[:2]), model.num_classes, model.depth_token_only, model.qkv_bias,
                model.mlp_ratio, model.mlp_ratio_token_only, model.global_pool, model.norm_eps)
        theirs = (args['patch_size'], args['embed_dim'], args['depth'], args['num_heads'], args['init_values'],
                  tuple(cfg.input_size), cfg.num_classes, 2, True, 4.0, 4.0, 'token', 1e-6)
        count = vit_flax.count_params(model.clone(depth=1))
        tm = timm_meta(name, depth=1)
        if ours != theirs or count != sum(p.numel() for p in tm.parameters()):
            wrong[name] = (ours, theirs, count)
    assert not wrong, wrong


@pytest.mark.slow   # the whole models traced (~2 s a name here)
@pytest.mark.parametrize('name', TIMM_NAMES)
def test_full_model_parameter_count_equals_timms(name):
    assert vit_flax.count_params(vit_flax.create_model(name)) == sum(p.numel() for p in timm_meta(name).parameters())


def timm_reduced(model, name, seed=0):
    """timm's Cait of `model`'s architecture, every parameter moved off its init, LayerScale moved to ~0.5 so that
    every branch counts, the patch embedding scaled down so that the first norm sees inputs of small variance (where
    its eps decides the output)."""
    tm = perturb_timm(FAMILY.torch_model(model, name), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for k, p in tm.named_parameters():
            if 'gamma_' in k:
                p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=g))
            if k.endswith(('proj_l.weight', 'proj_w.weight')):   # mixers far from 0 so the heads really mix
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return tm


@pytest.mark.parametrize('extra', [{}, pytest.param(
    dict(global_pool='avg', qkv_bias=False, mlp_ratio=2.0, depth_token_only=1), marks=pytest.mark.slow)],
    ids=['cait', 'avg-nobias-mlp2-1class'])   # the options' copy compiles a second model: make test-slow
def test_reduced_copy_equals_timm_both_ways(extra):
    """Two talking-heads blocks and the class-attention blocks, width 48, 32 px, weights moved off their init: timm's
    state_dict read through the rule table gives timm's logits (1e-5 relative), and written back it is timm's
    state_dict bit for bit, which timm loads strictly; timm's options (mean pooling, no qkv bias, other MLP width,
    one class block) too. Every intermediate timm names is compared on the way."""
    model = vit_flax.create_model('cait_xxs24_224', **REDUCED, **extra)
    tm = timm_reduced(model, 'cait_xxs24_224')
    state = state_np(tm)
    flat = rules.torch_to_flax(state, FAMILY.rules(model))
    x = images((2, 32, 32, 3))
    got = {}
    hooks = [dict(tm.named_modules())[m].register_forward_hook(
        lambda mod, i, o, f=f: got.__setitem__(f, o.detach().numpy())) for _, f, m in FAMILY.parity_points(model)]
    want = run_timm(tm, x)
    for h in hooks:
        h.remove()
    logits, inter = jax.jit(lambda p, x: model.apply({'params': p}, x, mutable=['intermediates']))(
        unflatten_dict(flat, sep='/'), x)
    errs = {f: rel_err(inter['intermediates'][f][0], got[f]) for f in got}
    errs['logits'] = rel_err(logits, want)
    assert max(errs.values()) < 1e-5, errs
    back = rules.flax_to_torch(flat, FAMILY.rules(model))
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
    twin = FAMILY.torch_model(model, 'cait_xxs24_224')
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_macs_equal_torch_flop_counter():
    """`vit-flax summary`'s MAC count against torch's FLOP counter on timm's model (FLOPs = 2 x MACs), at
    cait_s24_224's widths and input size with one self-attention block (talking heads' mixers, class attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = vit_flax.create_model('cait_s24_224', depth=1)
    with torch.device('meta'):
        tm = FAMILY.torch_model(model, 'cait_s24_224').eval()
    with FlopCounterMode(display=False) as counter:
        tm(torch.empty(1, 3, 224, 224, device='meta'))
    assert vit_flax.count_macs(model) * 2 == counter.get_total_flops()


def test_option_values_are_checked_before_a_model_is_built():
    with pytest.raises(vit_flax.UnknownOptionError, match='global_pool'):
        vit_flax.create_model('cait_xxs24_224', global_pool='map')
    with pytest.raises(ModelConfigError, match='not divisible by num_heads 5'):
        vit_flax.count_params(vit_flax.create_model('cait_xxs24_224', num_heads=5))


def test_a_cait_takes_only_the_grid_its_position_table_is_sized_for():
    model = vit_flax.create_model('cait_xxs24_224', **REDUCED)
    with pytest.raises(ModelConfigError, match=r'sized for a \(4, 4\) grid'):
        jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), jax.ShapeDtypeStruct((1, 48, 48, 3), 'float32'))


def test_train_depth_flag_sets_a_caits_self_attention_depth():
    """`vit-flax train --depth N` sets timm's `depth` (the talking-heads blocks; the class blocks stay)."""
    from types import SimpleNamespace
    from vit_train.loop import build_model
    args = SimpleNamespace(model='cait_xxs24_224', img_size=32, patch_size=8, depth=2, drop_path=0.1, remat=None,
                           dtype='float32')
    model, over, size = build_model(args, 10)
    assert (model.depth, model.depth_token_only, model.drop_path_rate, size) == (2, 2, 0.1, 32)


@pytest.mark.slow   # a CaiT train step compiled (~30 s on the shared 2-core machine)
def test_a_training_step_with_drop_path_and_dropout_lowers_the_loss_and_updates_every_parameter():
    """vit_train's step on a one-block CaiT with stochastic depth and every dropout on (their draws from the step's
    rng): four SGD steps on one batch lower the loss, every parameter (class token, position table, talking heads'
    mixers, class attention, LayerScale: started at 0.5, so that the blocks' gradients are not 1e-5 of the
    head's) is updated, finite."""
    from flax.traverse_util import flatten_dict
    import jax.numpy as jnp
    from vit_train import optim, step as steps
    model = vit_flax.create_model('cait_xxs24_224', **dict(REDUCED, depth=1, depth_token_only=1), init_values=0.5,
                                  drop_path_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, pos_drop_rate=0.1, drop_rate=0.1)
    params = vit_flax.init_params(model, jax.random.PRNGKey(0))
    flat = flatten_dict(params, sep='/')
    tx = optim.make('sgd', 0.0, {k: False for k in flat}, momentum=0.0)
    fn = jax.jit(steps.make_train_step(model, tx, list(flat), mean=(0.5,) * 3, std=(0.5,) * 3))
    rng = np.random.default_rng(0)
    batch = dict(image=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), label=rng.integers(0, 10, 8),
                 weight=np.ones(8, np.float32), unreadable=np.zeros(8, np.int32))
    state = dict(params=params, opt_state=tx.init(flat), step=jnp.int32(0))
    losses = []
    for _ in range(4):
        state, metrics = fn(state, batch, 0.1)
        losses.append(float(metrics['loss']))
    assert losses[-1] < losses[0] and bool(metrics['params_finite']), losses
    new = flatten_dict(state['params'], sep='/')
    assert [k for k in flat if np.array_equal(np.asarray(new[k]), np.asarray(flat[k]))] == []
