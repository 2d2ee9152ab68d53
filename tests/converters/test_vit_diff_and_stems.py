"""timm's ViTs built from blocks and stems beyond the plain ViT (the names that were `NOT_BUILT`): differential
attention (DiffAttention, DiffParallelScalingBlock), the ResNet-D hybrids (BatchNorm statistics included) and
MobileCLIP's MCI stem, read from timm's own files (.safetensors) with timm's logits, and written back bit for
bit as .pth and .safetensors after a trip through Google's tree (.npz).

One reduced copy per kind (one block, a small input, weights and buffers moved off their init); the per-name
sweep (counts, GMACs, rule table both ways) is tests/models/test_vit_registry.py's."""
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file
from safetensors.torch import save_file

from converters import pipeline

from helpers import images, perturb_timm, rel_err, run_flax, run_timm, state_np

# (timm name, reduced-copy arguments shared by timm and us, what the file must be read as)
KINDS = [
    ('vit_dwee_patch16_reg1_gap_256', dict(depth=2, img_size=32), dict(attn_layer='diff', block_fn='block')),
    ('vit_dpwee_patch16_reg1_gap_256', dict(depth=1, img_size=32),
     dict(attn_layer='diff', block_fn='parallel_scaling')),
    # odd sides (35 -> 18 -> 9 -> 5 -> 3) through the ceil-mode average pools of the shortcuts
    ('vit_small_resnet26d_224', dict(depth=1, img_size=70), dict(resnet_d=(2, 2, 2, 2), mci_stem=False)),
    ('vit_base_mci_224', dict(depth=1, img_size=48), dict(mci_stem=True, resnet_d=None, no_embed_class=True)),
]


def _timm(name, kw, seed=0):
    import timm
    tm = perturb_timm(timm.create_model(name, pretrained=False, **kw), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # BatchNorm statistics off their init too
        for key, b in tm.named_buffers():
            if key.endswith('running_mean'):
                b.add_(torch.randn(b.shape, generator=g) * 0.1)
            elif key.endswith('running_var'):
                b.mul_(1 + torch.rand(b.shape, generator=g))
    return tm


@pytest.fixture(scope='module', params=KINDS, ids=[k[0] for k in KINDS])
def case(request, tmp_path_factory):
    name, kw, want = request.param
    tm = _timm(name, kw)
    d = tmp_path_factory.mktemp(name)
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(d / 'timm.safetensors'))
    size = kw['img_size']
    x = images((2, size, size, 3))
    return dict(name=name, kw=kw, want=want, tm=tm, dir=d, x=x, y=run_timm(tm, x), state=state_np(tm))


def test_timms_file_reads_as_the_named_model_with_timms_logits(case):
    model, params, ck = pipeline.load_model(case['dir'] / 'timm.safetensors', case['name'], **case['kw'])
    assert ck.layout == 'timm'
    assert {k: getattr(model, k) for k in case['want']} == case['want']
    assert rel_err(run_flax(model, params, case['x']), case['y']) < 1e-5


def test_written_back_through_googles_tree_timms_file_is_bit_for_bit_the_same(case):
    """timm's file -> our tree -> .npz (the linen tree) -> back to .pth and .safetensors: every array identical."""
    d = case['dir']
    model, params, _ = pipeline.load_model(d / 'timm.safetensors', case['name'], cast=False, **case['kw'])
    pipeline.write_flat(flatten_dict(params, sep='/'), model, d / 'ours.npz', force=True, log=lambda s: None)
    m2, p2, _ = pipeline.load_model(d / 'ours.npz', case['name'], cast=False, **case['kw'])
    assert m2 == model
    state = case['state']   # BatchNorm's num_batches_tracked included: 0 in a model never trained, as written
    for fmt in ('pth', 'safetensors'):
        pipeline.write_flat(flatten_dict(p2, sep='/'), m2, d / f'back.{fmt}', force=True, log=lambda s: None)
        back = load_file(str(d / 'back.safetensors')) if fmt == 'safetensors' else \
            {k: v.numpy() for k, v in torch.load(d / 'back.pth', weights_only=True).items()}
        assert set(back) == set(state), fmt
        assert all(back[k].dtype == state[k].dtype and back[k].shape == state[k].shape
                   and np.array_equal(back[k], state[k]) for k in state), fmt
