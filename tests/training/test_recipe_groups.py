"""Layer-wise lr decay and weight-decay flags equal timm's param_groups_layer_decay (the real timm.optim code)
for a small ViT, a distilled DeiT, small Swins (V1, V2, V2 CR), a gMLP and a CaiT, parameter by parameter under timm's
names."""
import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import vit_flax
from vit_train import layer_decay, optim

CASES = {
    'vit': ('vit_small_patch16_224', dict(img_size=32, patch_size=8, depth=3, num_classes=10)),
    'deit-distilled': ('deit_tiny_distilled_patch16_224', dict(img_size=32, patch_size=8, depth=2, num_classes=10)),
    'swin': ('swin_tiny_patch4_window7_224', dict(img_size=32, window_size=2, depths=(1, 1, 2, 1), num_classes=10)),
    'swinv2': ('swinv2_tiny_window8_256', dict(img_size=32, window_size=2, depths=(1, 1, 2, 1), num_classes=10)),
    'swinv2_cr': ('swinv2_cr_tiny_224', dict(img_size=32, window_size=2, depths=(1, 1, 2, 1), num_classes=10)),
    'gmlp': ('gmlp_ti16_224', dict(img_size=32, num_classes=10)),   # timm's entrypoint fixes its 30 blocks
    'cait': ('cait_xxs24_224', dict(img_size=32, depth=3, num_classes=10)),   # class blocks overlap the last blocks
}


def _timm_groups(name, kw, decay):
    import timm
    from timm.optim import param_groups_layer_decay
    t = timm.create_model(name, **kw)
    out = {}
    skip = t.no_weight_decay() if hasattr(t, 'no_weight_decay') else ()   # as timm's create_optimizer_v2 asks
    for g in param_groups_layer_decay(t, weight_decay=0.05, no_weight_decay_list=skip,
                                      layer_decay=decay):
        for p in g['params']:
            n = next(n for n, q in t.named_parameters() if q is p)
            out[n] = (g['lr_scale'], g['weight_decay'] > 0)
    return out


@pytest.mark.parametrize('case', list(CASES))
def test_param_groups_equal_timms(case, tmp_path):
    name, kw = CASES[case]
    model = vit_flax.create_model(name, **kw)
    shapes = flatten_dict(jax.eval_shape(lambda: vit_flax.init_params(model)), sep='/')
    groups = layer_decay.param_groups(model, {k: v.shape for k, v in shapes.items()}, 0.65, optim.decays)
    want = _timm_groups(name, kw, 0.65)
    assert set(groups) == set(want)
    for t, (scale, wd) in want.items():
        g = groups[t]
        assert g['lr_scale'] == pytest.approx(scale, rel=1e-12), t
        assert g['weight_decay'] == g['timm_weight_decay'] == wd, t
    covered = sorted(k for g in groups.values() for k in g['ours'])
    assert covered == sorted(shapes)
    assert len({g['lr_scale'] for g in groups.values()}) > 3           # the decay did something
    layer_decay.write(str(tmp_path / 'param_groups.json'), groups, 0.65)
    import json
    rec = json.loads((tmp_path / 'param_groups.json').read_text())
    assert rec['params'].keys() == want.keys() and rec['num_layers'] == max(g['layer_id'] for g in groups.values()) + 1


def test_layer_ids_are_timms_for_vit_depth_3():
    """REFERENCE-TRAINING.md: depth 3, decay .75 -> .316/.422/.563/.75/1.0; the final norm with the last block."""
    model = vit_flax.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=3, num_classes=10)
    shapes = flatten_dict(jax.eval_shape(lambda: vit_flax.init_params(model)), sep='/')
    g = layer_decay.param_groups(model, {k: v.shape for k, v in shapes.items()}, 0.75, optim.decays)
    assert [round(g[n]['lr_scale'], 3) for n in ('cls_token', 'blocks.0.norm1.weight', 'blocks.1.mlp.fc1.weight',
                                                 'blocks.2.attn.qkv.bias', 'norm.weight', 'head.weight')] == \
        [0.316, 0.422, 0.562, 0.75, 0.75, 1.0]


def test_scaled_update_is_lr_times_scale():
    import jax.numpy as jnp
    params = {'a': jnp.ones((2, 2)), 'b': jnp.ones(3)}
    grads = {'a': jnp.full((2, 2), 0.5), 'b': jnp.full(3, 0.5)}
    tx = optim.make('sgd', 0.0, {'a': False, 'b': False}, momentum=0.0)
    new, _ = optim.apply(tx, grads, tx.init(params), params, 0.1, {'a': 1.0, 'b': 0.25})
    np.testing.assert_allclose(np.asarray(new['a']), 1 - 0.05)
    np.testing.assert_allclose(np.asarray(new['b']), 1 - 0.0125)
