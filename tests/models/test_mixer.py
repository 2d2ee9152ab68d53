"""timm's `mlp_mixer` module (MLP-Mixer, gMixer, ResMLP, gMLP), each registration built here under timm's name and
judged against timm itself: the names, default input size, classes, depth and parameter counts of all of them,
and per distinct architecture the logits of a reduced copy both ways and the MACs against torch's counter."""
import jax
import numpy as np
import pytest
import timm
import torch
from flax.traverse_util import unflatten_dict

import vit_flax
from converters import rules
from converters.families.mixer import FAMILY
from vit_flax.errors import ModelConfigError
from vit_flax.models.mixer import MlpMixer

from helpers import images, perturb_timm, rel_err, run_flax, run_timm, state_np

jax.config.update('jax_default_matmul_precision', 'highest')

TIMM_NAMES = sorted(timm.list_models(module='mlp_mixer'))
# one name per distinct computation: Mixer, gMixer (GLU + SiLU), ResMLP (Affine, LayerScale), gMLP (spatial gate)
ARCHITECTURES = ['mixer_s32_224', 'gmixer_12_224', 'resmlp_12_224', 'gmlp_ti16_224']
REDUCED = dict(num_blocks=2, embed_dim=32, img_size=32, patch_size=8)


def timm_meta(name):
    with torch.device('meta'):
        return timm.create_model(name, pretrained=False)


def test_every_mlp_mixer_registration_of_timm_is_built():
    ours = sorted(n for n in vit_flax.list_models() if vit_flax.model_config(n)[0] is MlpMixer)
    assert ours == TIMM_NAMES and len(ours) == 15


def blocks_count(name) -> int:
    """The parameter count of `name` from traced builds (jax.eval_shape) of one and two blocks: the blocks are
    identical, so the count is linear in their number (exact, and ~10x cheaper than tracing 24-36 blocks)."""
    model = vit_flax.create_model(name)
    one, two = (vit_flax.count_params(model.clone(num_blocks=n)) for n in (1, 2))
    return one + (two - one) * (model.num_blocks - 1)


def test_every_registration_has_timms_input_size_classes_blocks_and_parameter_count():
    wrong = {}
    for name in TIMM_NAMES:
        model, tm = vit_flax.create_model(name), timm_meta(name)
        ours = (tuple(model.input_shape), model.num_classes, model.num_blocks, model.num_features, blocks_count(name))
        theirs = ((*tm.stem.img_size, tm.in_chans), tm.num_classes, len(tm.blocks), tm.num_features,
                  sum(p.numel() for p in tm.parameters()))
        if ours != theirs:
            wrong[name] = (ours, theirs)
    assert not wrong, wrong


@pytest.mark.slow   # the whole models traced (~1.5 s a name here)
@pytest.mark.parametrize('name', TIMM_NAMES)
def test_full_model_parameter_count_equals_timms(name):
    assert vit_flax.count_params(vit_flax.create_model(name)) == sum(p.numel() for p in timm_meta(name).parameters())


@pytest.mark.parametrize('name,extra', [(n, {}) for n in ARCHITECTURES] + [('resmlp_12_224', dict(stem_norm=True))],
                         ids=ARCHITECTURES + ['resmlp-stem_norm'])
def test_reduced_copy_of_each_architecture_equals_timm_both_ways(name, extra):
    """Two blocks, width 32, 32 px, weights moved off their init: timm's state_dict read through the rule table
    gives timm's logits (1e-5 relative), and written back it is timm's state_dict bit for bit, which timm loads
    strictly. The stem and gMLP's first Linear are scaled down so that the norms after them see inputs of tiny
    variance, where their eps (1e-6, the gate's 1e-5) decides the output: a wrong eps fails. timm's `stem_norm`
    (no registration uses it) on a ResMLP."""
    model = vit_flax.create_model(name, **REDUCED, **extra)
    tm = perturb_timm(FAMILY.torch_model(model, name))
    with torch.no_grad():
        for p in [tm.stem.proj.weight, tm.stem.proj.bias] + [
                p for b in tm.blocks if hasattr(b.mlp_channels, 'gate') for p in b.mlp_channels.fc1.parameters()]:
            p.mul_(1e-3)
    state = state_np(tm)
    flat = rules.torch_to_flax(state, FAMILY.rules(model))
    x = images((2, 32, 32, 3))
    err = rel_err(run_flax(model, unflatten_dict(flat, sep='/'), x), run_timm(tm, x))
    assert err < 1e-5, err
    back = rules.flax_to_torch(flat, FAMILY.rules(model))
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
    twin = FAMILY.torch_model(model, name)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


@pytest.mark.parametrize('name', ARCHITECTURES)
def test_macs_of_each_architecture_equal_torch_flop_counter(name):
    """`vit-flax summary`'s MAC count against torch's FLOP counter on timm's model (FLOPs = 2 x MACs), at the
    registered widths and input size with one block."""
    from torch.utils.flop_counter import FlopCounterMode
    model = vit_flax.create_model(name, num_blocks=1)
    with torch.device('meta'):
        tm = FAMILY.torch_model(model, name).eval()
    with FlopCounterMode(display=False) as counter:
        tm(torch.empty(1, 3, 224, 224, device='meta'))
    assert vit_flax.count_macs(model) * 2 == counter.get_total_flops()


def test_option_values_are_checked_before_a_model_is_built():
    with pytest.raises(vit_flax.UnknownOptionError, match='block_layer'):
        vit_flax.create_model('mixer_s16_224', block_layer='conv')
    with pytest.raises(ModelConfigError, match="mlp_layer 'gated'"):
        vit_flax.count_params(vit_flax.create_model('gmlp_ti16_224', mlp_layer='mlp'))
    with pytest.raises(ModelConfigError, match='halves'):
        vit_flax.count_params(vit_flax.create_model('gmixer_12_224', embed_dim=33))


def test_a_mixer_takes_only_the_grid_its_token_mixing_is_sized_for():
    model = vit_flax.create_model('mixer_s32_224', **REDUCED)
    with pytest.raises(ModelConfigError, match=r'sized for a \(4, 4\) grid'):
        jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), jax.ShapeDtypeStruct((1, 48, 48, 3), 'float32'))


def test_train_depth_flag_sets_a_mixers_num_blocks():
    """`vit-flax train --depth N` means blocks for every family: a Mixer's field is timm's `num_blocks`."""
    from types import SimpleNamespace
    from vit_train.loop import build_model
    args = SimpleNamespace(model='gmlp_ti16_224', img_size=32, patch_size=8, depth=2, drop_path=0.1, remat=None,
                           dtype='float32')
    model, over, size = build_model(args, 10)
    assert (model.num_blocks, model.drop_path_rate, size) == (2, 0.1, 32)
    assert over == dict(num_classes=10, img_size=32, patch_size=8, num_blocks=2, drop_path_rate=0.1)
