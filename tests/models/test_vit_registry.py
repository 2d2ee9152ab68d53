"""timm's ViT registrations (`vision_transformer`, `deit`, `vision_transformer_hybrid`, without its test
models), each built here under timm's name, judged against timm itself: which names exist, the default input
size, classes and parameter counts, and logits both ways on a reduced-depth copy of one name per distinct
architecture."""
import contextlib
from unittest import mock

import flax
import pytest
import timm
import timm.models.deit
import timm.models.vision_transformer
import timm.models.vision_transformer_hybrid
import torch
from timm.models import _registry

import vit_flax
from converters import rules
from converters.families.vit import FAMILY
from vit_flax.models.vit_timm import NOT_BUILT
from vit_flax.registry import model_config

from helpers import images, perturb_timm, rel_err, run_flax, run_timm, state_np

MODULES = ('vision_transformer', 'deit', 'vision_transformer_hybrid')
TIMM_NAMES = sorted(n for n in timm.list_models() if _registry._model_to_module[n] in MODULES
                    and not n.startswith('test_'))
BUILT = [n for n in TIMM_NAMES if n not in NOT_BUILT]


class _Args(Exception):
    pass


def timm_model_args(name) -> dict:
    """The arguments timm's entrypoint for `name` builds its model with (nothing is built)."""
    def capture(cls, variant, pretrained=False, **kw):
        raise _Args(kw)
    with contextlib.ExitStack() as patches:
        for module in (timm.models.vision_transformer, timm.models.deit, timm.models.vision_transformer_hybrid):
            patches.enter_context(mock.patch.object(module, 'build_model_with_cfg', capture))
        try:
            timm.create_model(name, pretrained=False)
        except _Args as e:
            return e.args[0]
    raise AssertionError(f'{name}: timm built a model without build_model_with_cfg')


def timm_meta(name, **kw):
    with torch.device('meta'):
        return timm.create_model(name, pretrained=False, **kw)


def timm_param_count(name, shallow=None, depth=None) -> int:
    """timm's parameter count for `name` from builds of depth 1 (`shallow`, if built already) and 2 on the meta
    device: blocks are identical, so the count is linear in depth (exact, and far cheaper than building the
    whole model). BatchNorm's running statistics count: they are params here (the hybrids' frozen BatchNorm)."""
    def count(m):
        stats = (b for n, b in m.named_buffers() if n.endswith(('running_mean', 'running_var')))
        return sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in stats)
    one = count(shallow or timm_meta(name, depth=1))
    two = count(timm_meta(name, depth=2))
    return one + (two - one) * ((depth or timm_model_args(name)['depth']) - 1)


def test_every_timm_vit_registration_is_built_or_named_as_not_built():
    registered = set(vit_flax.list_models())
    assert not set(NOT_BUILT) & registered
    assert set(NOT_BUILT) <= set(TIMM_NAMES)
    missing = [n for n in TIMM_NAMES if n not in registered and n not in NOT_BUILT]
    assert not missing, f'timm names neither built nor listed in NOT_BUILT: {missing}'
    assert (len(TIMM_NAMES), len(BUILT)) == (189, 189)


def check_sizes_and_counts(names, count):
    """Each name's input size, classes and depth against timm's (its model on the meta device, its entrypoint's
    arguments), and with `count` its parameter count too (traced: ~0.15 s a name here)."""
    wrong = {}
    for name in names:
        model, tm = vit_flax.create_model(name, scan_blocks=True), timm_meta(name, depth=1)  # scan: one block traced
        depth = timm_model_args(name)['depth']
        ours = (tuple(model.input_shape[:2]), model.num_classes, model.depth)
        theirs = (tuple(tm.patch_embed.img_size), tm.num_classes, depth)
        if count:
            ours, theirs = ours + (vit_flax.count_params(model),), theirs + (timm_param_count(name, tm, depth),)
        if ours != theirs:
            wrong[name] = (ours, theirs)
    assert not wrong, wrong


def test_timm_names_build_timms_input_size_classes_and_depth():
    check_sizes_and_counts(BUILT, count=False)


def test_one_name_per_architecture_has_timms_parameter_count():
    """The parameter count of one name per distinct computation (the smallest; hybrids included) in `make test`;
    of every name (a width, depth, head count or MLP ratio registered wrong on any of them) under slow."""
    check_sizes_and_counts(_architectures(), count=True)


@pytest.mark.slow   # the sweep: 181 names (~35 s of CPU here, the slowest single test of `make test` before)
def test_timm_names_build_timms_input_size_classes_depth_and_parameter_count():
    check_sizes_and_counts(BUILT, count=True)


# Fields that do not change which computation a name is (sizes, resolution, classes): one name per remaining
# combination is compared with timm.
_SIZE_FIELDS = {'img_size', 'num_classes', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'patch_size',
                'init_values', 'norm_eps'}


def _architectures():
    seen = {}
    for name in BUILT:
        cfg = model_config(name)[1]
        key = tuple(sorted((k, str(v)) for k, v in cfg.items() if k not in _SIZE_FIELDS))
        if key not in seen or cfg.get('embed_dim', 768) < model_config(seen[key])[1].get('embed_dim', 768):
            seen[key] = name
    return sorted(seen.values())


ARCHITECTURES = [n for n in _architectures() if model_config(n)[1].get("resnet") is None]  # hybrids: test_google_families
# the ResNet-D hybrids' reduced copies compile a whole ResNet (~6 s each on a quiet machine): one of them, with its
# BatchNorm statistics moved too, is tests/converters/test_vit_diff_and_stems.py's in `make test`
REDUCED = [pytest.param(n, marks=pytest.mark.slow) if model_config(n)[1].get('resnet_d') else n for n in ARCHITECTURES]


@pytest.mark.parametrize('name', REDUCED)
def test_reduced_copy_of_each_architecture_equals_timm_both_ways(name):
    """Depth 1 at a small input, weights moved off their init: timm's state_dict read through the rule table
    gives timm's logits, and written back it loads into timm strictly, bit for bit."""
    model = vit_flax.create_model(name, depth=1)
    size = 2 * model.token_stride[0] * (2 if model.resnet is not None else 1)
    model = model.clone(img_size=size)
    tm = perturb_timm(timm.create_model(name, pretrained=False, depth=1, img_size=size))
    state = state_np(tm)
    flat = rules.torch_to_flax(state, FAMILY.rules(model))
    x = images((2, size, size, 3))
    assert rel_err(run_flax(model, flax.traverse_util.unflatten_dict(flat, sep='/'), x), run_timm(tm, x)) < 1e-5
    back = rules.flax_to_torch(flat, FAMILY.rules(model))
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape and (back[k] == state[k]).all() for k in state)


@pytest.mark.parametrize('name', ARCHITECTURES)
def test_macs_of_each_architecture_equal_torch_flop_counter(name):
    """`vit-flax summary`'s MAC count (a jaxpr walk) against torch's own FLOP counter on timm's model, at its
    default input size with one block (FLOPs = 2 x MACs)."""
    from torch.utils.flop_counter import FlopCounterMode
    tm = timm_meta(name, depth=1).eval()
    h, w = tm.patch_embed.img_size
    with FlopCounterMode(display=False) as counter:
        tm(torch.empty(1, 3, h, w, device='meta'))
    assert vit_flax.count_macs(vit_flax.create_model(name, depth=1)) * 2 == counter.get_total_flops()
