"""timm's `vision_transformer_relpos` module (ViT with relative position MLPs or tables, no absolute table), each of
its 14 registrations built here under timm's name and judged against timm itself: names, input size, classes,
depth, defaults and parameter counts of all of them, and per distinct architecture the logits of a reduced copy
(both ways through the rule table) and the MACs against torch's counter."""
import jax
import numpy as np
import pytest
import timm
import torch
from flax.traverse_util import unflatten_dict

import vit_flax
from converters import rules
from converters.families.relpos import FAMILY
from vit_flax.errors import ModelConfigError
from vit_flax.models.relpos import VisionTransformerRelPos

from helpers import images, perturb_timm, rel_err, run_flax, run_timm, state_np

jax.config.update('jax_default_matmul_precision', 'highest')

TIMM_NAMES = sorted(timm.list_models(module='vision_transformer_relpos'))
REDUCED = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8)
# one case per distinct computation: the log-coordinate MLP per block with fc_norm and LayerScale; the residual
# post-norm block with Swin V2's MLP mode (sigmoid x 16, no fc2 bias) and q/k norms; one MLP shared by all blocks;
# a class token (the MLP bias zero-padded for it) read by 'token' pooling; a class token beside avg pooling and
# fc_norm with learned tables per block ('bias': timm's RelPosBias, BEiT's three class-token rows); fused-qkv
# biases, one shared table and the final norm. (No registration uses 'mlp_swin', 'bias' or qk_norm; timm takes
# them as arguments.)
CASES = [
    ('vit_relpos_small_patch16_224', {}),
    ('vit_relpos_small_patch16_rpn_224', dict(rel_pos_type='mlp_swin', qk_norm=True)),
    ('vit_srelpos_small_patch16_224', {}),
    ('vit_relpos_medium_patch16_cls_224', {}),
    ('vit_relpos_base_patch16_clsgap_224', dict(rel_pos_type='bias')),
    ('vit_relpos_base_patch16_plus_240', dict(rel_pos_type='bias', shared_rel_pos=True)),
]
IDS = ['mlp-fc_norm', 'res_post-mlp_swin-qk_norm', 'shared-mlp', 'cls-token', 'cls-gap-bias', 'shared-bias-qkv_bias']
# timm's constructor arguments a registration may set, and our field for each (`block_fn`: the block class)
FIELDS = ('embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'qkv_bias', 'qk_norm', 'class_token', 'fc_norm',
          'global_pool', 'shared_rel_pos', 'init_values')


def timm_meta(name):
    with torch.device('meta'):
        return timm.create_model(name, pretrained=False)


def test_every_relpos_registration_of_timm_is_built():
    ours = sorted(n for n in vit_flax.list_models() if vit_flax.model_config(n)[0] is VisionTransformerRelPos)
    assert ours == TIMM_NAMES and len(ours) == 14


def depth_count(name) -> int:
    """The parameter count of `name` from a traced build of one block: the blocks are alike, so the count is the
    rest plus depth x one block's (exact, and far cheaper than tracing 12 blocks)."""
    from vit_flax.summary import param_shapes
    model = vit_flax.create_model(name)
    shapes = param_shapes(model.clone(depth=1))
    size = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
    return size(shapes) + size(shapes['blocks_0']) * (model.depth - 1)


def timm_fields(tm) -> dict:
    """The registration's arguments as timm's built model holds them."""
    blk = tm.blocks[0]
    post = type(blk).__name__ == 'ResPostRelPosBlock'   # its norms' weights start at init_values, no LayerScale
    rel = tm.shared_rel_pos if tm.shared_rel_pos is not None else blk.attn.rel_pos
    return dict(embed_dim=tm.embed_dim, depth=len(tm.blocks), num_heads=blk.attn.num_heads,
                mlp_ratio=blk.mlp.fc1.out_features / tm.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
                qk_norm=not isinstance(blk.attn.q_norm, torch.nn.Identity), class_token=tm.cls_token is not None,
                fc_norm=not isinstance(tm.fc_norm, torch.nn.Identity), global_pool=tm.global_pool,
                shared_rel_pos=tm.shared_rel_pos is not None,
                init_values=blk.init_values if post else getattr(blk.ls1, 'init_values', None),
                block_fn='res_post' if post else 'block',
                rel_pos_dim=rel.mlp.fc1.out_features, rel_pos_type='mlp' if rel.mode == 'cr' else 'mlp_swin',
                norm_eps=tm.norm.eps if hasattr(tm.norm, 'eps') else tm.fc_norm.eps)


def test_every_registration_has_timms_input_size_classes_defaults_and_parameter_count():
    """Per name: timm's default input size (its pretrained_cfg's and its patch grid's), classes, every argument its
    entrypoint sets (as its built model holds them), the count of parameters; all 14."""
    wrong = {}
    for name in TIMM_NAMES:
        model, tm = vit_flax.create_model(name), timm_meta(name)
        mine = {k: getattr(model, k) for k in FIELDS}
        mine.update(block_fn=model.block_fn, rel_pos_dim=model.rel_pos_hidden, rel_pos_type=model.rel_pos_type,
                    norm_eps=model.norm_eps)
        ours = (tuple(model.input_shape), model.num_classes, mine, depth_count(name))
        theirs = ((*tm.patch_embed.img_size, tm.in_chans), tm.num_classes, timm_fields(tm),
                  sum(p.numel() for p in tm.parameters()))
        if ours != theirs or tuple(tm.pretrained_cfg['input_size'][1:]) != tuple(model.input_shape[:2]):
            wrong[name] = (ours, theirs)
    assert not wrong, wrong


@pytest.mark.slow   # every whole model traced
@pytest.mark.parametrize('name', TIMM_NAMES)
def test_full_model_parameter_count_equals_timms(name):
    assert vit_flax.count_params(vit_flax.create_model(name)) == sum(p.numel() for p in timm_meta(name).parameters())


def scale_for_parity(tm):
    """timm's model with its patch embedding x 1e-3 and every relative position weight x 10 (module docstring)."""
    with torch.no_grad():
        for k, p in tm.named_parameters():
            if k.startswith('patch_embed.'):
                p.mul_(1e-3)
            elif 'rel_pos.' in k:
                p.mul_(3 if 'mlp' in k else 5)
    return tm


@pytest.mark.parametrize('name,extra', CASES, ids=IDS)
def test_reduced_copy_of_each_architecture_equals_timm_both_ways(name, extra):
    """Two blocks, width 32, 2 heads, 32 px (a 4x4 grid), weights moved off their init: timm's state_dict read
    through the rule table gives timm's logits (1e-5 relative), and written back it is timm's state_dict bit for
    bit, which timm loads strictly. The patch embedding is scaled down so that the first norms see inputs of tiny
    variance, where their eps (1e-6) decides the output; the relative position weights are scaled up so that the
    biases move the logits by O(1) (at their init's scale a transposed index or a wrong gain stays under 1e-5)."""
    model = vit_flax.create_model(name, **REDUCED, **extra)
    tm = scale_for_parity(perturb_timm(FAMILY.torch_model(model, name), scale=0.2))
    state = state_np(tm)
    flat = rules.torch_to_flax(state, FAMILY.rules(model))
    x = images((2, 32, 32, 3))
    err = rel_err(run_flax(model, unflatten_dict(flat, sep='/'), x), run_timm(tm, x))
    assert err < 1e-5, err
    back = rules.flax_to_torch(flat, FAMILY.rules(model))
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
    twin = FAMILY.torch_model(model, name)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


@pytest.mark.parametrize('name,extra', [CASES[0], CASES[2], CASES[3], CASES[4]],
                         ids=['mlp', 'shared-mlp', 'cls-token', 'bias'])
def test_macs_of_each_architecture_equal_torch_flop_counter(name, extra):
    """`vit-flax summary`'s MAC count against torch's FLOP counter on timm's model (FLOPs = 2 x MACs), at the
    registered widths and input size with one block (the bias MLP's two Linears counted on both sides)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = vit_flax.create_model(name, depth=1, **extra)
    with torch.device('meta'):
        tm = FAMILY.torch_model(model, name).eval()
    h, w = model.input_shape[:2]
    with FlopCounterMode(display=False) as counter:
        tm(torch.empty(1, 3, h, w, device='meta'))
    assert vit_flax.count_macs(model) * 2 == counter.get_total_flops()


def test_option_values_are_checked_before_a_model_is_built():
    with pytest.raises(vit_flax.UnknownOptionError, match='rel_pos_type'):
        vit_flax.create_model('vit_relpos_small_patch16_224', rel_pos_type='rope')
    with pytest.raises(ModelConfigError, match='class token'):
        vit_flax.count_params(vit_flax.create_model('vit_relpos_small_patch16_224', global_pool='token'))


def test_a_relpos_model_takes_only_the_grid_its_relative_positions_are_sized_for():
    model = vit_flax.create_model('vit_relpos_small_patch16_224', **REDUCED)
    with pytest.raises(ModelConfigError, match=r'sized for the \(4, 4\) patch grid'):
        jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), jax.ShapeDtypeStruct((1, 48, 48, 3), 'float32'))


def test_a_training_step_lowers_the_loss_and_reaches_every_parameter_with_the_bias_mlps_dropout():
    """One SGD step in training mode (timm's RelPosMlp drops 12.5% of its hidden units after the ReLU): every
    parameter of a class token + avg-pool model gets a gradient (the class token and the bias MLP too; with one
    block and token pooling the MLP gets none, the class token's row of its bias being 0), the step lowers the
    loss on the same batch and masks; two dropout keys give two losses (that dropout the only one here);
    `vit-flax train --depth` sets `depth`."""
    import optax
    from types import SimpleNamespace
    from vit_train.loop import build_model
    model = vit_flax.create_model('vit_relpos_base_patch16_clsgap_224', **dict(REDUCED, depth=1, num_classes=5))
    x, y = images((4, 32, 32, 3)), np.arange(4) % 5
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))['params']
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.1).astype(np.float32), params)

    def loss(p, key):
        logits = model.apply({'params': p}, x, train=True, rngs={'dropout': key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    step = jax.jit(jax.value_and_grad(loss))
    key = jax.random.PRNGKey(3)
    l0, g = step(params, key)
    assert all(float(np.abs(np.asarray(v)).max()) > 0 for v in jax.tree.leaves(g))
    l1, _ = step(jax.tree.map(lambda p, d: p - 0.05 * d, params, g), key)
    assert float(l1) < float(l0)
    assert float(step(params, jax.random.PRNGKey(4))[0]) != float(l0)
    args = SimpleNamespace(model='vit_relpos_small_patch16_224', img_size=32, patch_size=8, depth=2, drop_path=0.1,
                           remat=None, dtype='float32')
    built, over, size = build_model(args, 10)
    assert (built.depth, built.drop_path_rate, size) == (2, 0.1, 32)
