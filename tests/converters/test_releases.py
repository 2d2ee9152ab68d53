"""The releases' own ViT files, read and written back, judged by the releases' own code: facebookresearch/dinov2's
DinoVisionTransformer (vendored in tests/reference/dinov2, as released) and open_clip's VisionTransformer."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from flax.traverse_util import flatten_dict

from converters import pipeline
from converters.errors import ConversionError

from helpers import cli, images, perturb_timm, rel_err, run_flax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'reference'))
from dinov2.models import vision_transformer as dinov2_vits  # noqa: E402


def _nchw(x):
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def _dinov2(registers: int, ffn: str, seed=0):
    """DINOv2's hub model (dinov2/hub/backbones.py's arguments) at ViT-S width, 2 blocks, a 5x5 grid."""
    torch.manual_seed(seed)
    m = dinov2_vits.vit_small(img_size=70, patch_size=14, init_values=1.0, block_chunks=0, ffn_layer=ffn,
                              num_register_tokens=registers, interpolate_antialias=bool(registers),
                              interpolate_offset=0.0 if registers else 0.1)
    m.blocks = m.blocks[:2]   # (vit_small fixes depth=12)
    return perturb_timm(m)


@pytest.mark.parametrize('registers,ffn', [(0, 'mlp'), (4, 'mlp'), (4, 'swiglufused')],
                         ids=['dinov2', 'dinov2-reg4', 'dinov2-reg4-swiglu'])
def test_dinov2_hub_files_read_and_write_back_for_dinov2s_own_model(tmp_path, registers, ffn):
    ref = _dinov2(registers, ffn)
    torch.save(ref.state_dict(), tmp_path / 'dinov2.pth')
    x = images((2, 70, 70, 3))
    with torch.no_grad():
        y = ref(_nchw(x)).numpy()
    name = 'vit_small_patch14_reg4_dinov2' if registers else 'vit_small_patch14_dinov2'
    extra = dict(act_layer='silu', mlp_dim=2048) if ffn != 'mlp' else {}
    model, params, ck = pipeline.load_model(tmp_path / 'dinov2.pth', name, img_size=70, depth=2, **extra)
    assert ck.layout == 'dinov2' and model.reg_tokens == registers and model.no_embed_class == bool(registers)
    assert model.mlp_layer == ('swiglu_packed' if ffn != 'mlp' else 'mlp')
    assert any('mask_token dropped' in n for n in ck.notes)
    assert rel_err(run_flax(model, params, x), y) < 1e-5
    pipeline.write_flat(flatten_dict(params, sep='/'), model, tmp_path / 'back.pth', layout='dinov2')
    fresh = _dinov2(registers, ffn, seed=1)
    fresh.load_state_dict(torch.load(tmp_path / 'back.pth', weights_only=True), strict=True)
    with torch.no_grad():
        assert rel_err(fresh.eval()(_nchw(x)).numpy(), y) < 1e-6


def test_dinov2_layout_refuses_what_dinovisiontransformer_cannot_hold(tmp_path):
    import vit_flax
    model = vit_flax.create_model('vit_small_patch14_dinov2', depth=1, img_size=28, num_classes=10)
    from helpers import perturb
    flat = flatten_dict(perturb(model), sep='/')
    with pytest.raises(ConversionError, match='cannot hold a classifier head'):
        pipeline.write_flat(flat, model, tmp_path / 'x.pth', layout='dinov2')
    assert not (tmp_path / 'x.pth').exists()


def _open_clip(act, ls, seed=0):
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(seed)
    return perturb_timm(VisionTransformer(image_size=64, patch_size=16, width=64, layers=2, heads=2, mlp_ratio=4.0,
                                          output_dim=32, act_layer=act, ls_init_value=ls))


@pytest.mark.parametrize('quick', [True, False], ids=['openai-quickgelu', 'laion-gelu-layerscale'])
def test_open_clip_checkpoints_read_the_image_tower_and_write_back_for_open_clip(tmp_path, quick):
    from open_clip.transformer import QuickGELU
    act, ls = (QuickGELU, None) if quick else (nn.GELU, 0.1)
    ref = _open_clip(act, ls)
    whole = {f'visual.{k}': v for k, v in ref.state_dict().items()}   # beside a text tower, as open_clip saves
    whole.update({'token_embedding.weight': torch.zeros(10, 8), 'positional_embedding': torch.zeros(7, 8),
                  'text_projection': torch.zeros(8, 32), 'logit_scale': torch.ones(())})
    torch.save(whole, tmp_path / 'open_clip_pytorch_model.bin')
    x = images((2, 64, 64, 3))
    with torch.no_grad():
        y = ref(_nchw(x)).numpy()
    sets = ['--set', 'embed_dim=64', '--set', 'depth=2', '--set', 'num_heads=2', '--set', 'img_size=64']
    sets += ['--set', 'act_layer=quick_gelu'] if quick else []
    r = cli('convert', tmp_path / 'open_clip_pytorch_model.bin', tmp_path / 'tower.safetensors',
            '--model', 'vit_base_patch16_clip_224', *sets)
    assert r.returncode == 0, r.stderr
    assert 'open_clip layout' in r.stderr and ('does not record its activation' in r.stderr) == (not quick)
    model, params, ck = pipeline.load_model(tmp_path / 'tower.safetensors', 'vit_base_patch16_clip_224',
                                            embed_dim=64, depth=2, num_heads=2, img_size=64,
                                            act_layer='quick_gelu' if quick else 'gelu')
    assert model.num_classes == 32 and model.pre_norm and bool(model.init_values) == (not quick)
    assert rel_err(run_flax(model, params, x), y) < 1e-5
    r = cli('convert', tmp_path / 'tower.safetensors', tmp_path / 'back.pth', '--layout', 'open_clip',
            '--model', 'vit_base_patch16_clip_224', *sets)
    assert r.returncode == 0, r.stderr
    fresh = _open_clip(act, ls, seed=1)
    fresh.load_state_dict(torch.load(tmp_path / 'back.pth', weights_only=True), strict=True)
    with torch.no_grad():
        assert rel_err(fresh.eval()(_nchw(x)).numpy(), y) < 1e-6


def test_flexivit_big_vision_file_loads_as_timms_own_npz_loader_reads_it(tmp_path):
    """FlexiViT's big_vision files hold a 32x32 patch kernel and a 7x7 position grid; timm's npz loader
    PI-resizes the kernel to flexivit_small's 16x16 (bilinear) and resamples the grid to 15x15. Ours the same."""
    import timm
    from timm.models.vision_transformer import _load_weights as timm_load_npz
    import vit_flax
    from converters import rules
    from converters.families.vit import FAMILY
    src = perturb_timm(timm.create_model('flexivit_small', pretrained=False, depth=2, patch_size=32, img_size=224))
    model32 = vit_flax.create_model('flexivit_small', depth=2, patch_size=32, img_size=224)
    flat = rules.torch_to_flax({k: v.numpy() for k, v in src.state_dict().items()}, FAMILY.rules(model32))
    pipeline.write_flat(flat, model32, tmp_path / 'flexivit.npz', layout='big_vision')
    raw = np.load(tmp_path / 'flexivit.npz')
    assert raw['params/embedding/kernel'].shape[:2] == (32, 32) and raw['params/pos_embedding'].shape[1] == 49
    theirs = timm.create_model('flexivit_small', pretrained=False, depth=2).eval()
    timm_load_npz(theirs, str(tmp_path / 'flexivit.npz'))
    lines = []
    params = pipeline.load_params(tmp_path / 'flexivit.npz', 'flexivit_small', depth=2, resample='bilinear',
                                  log=lines.append)
    assert any('pseudo-inverse resize' in ln for ln in lines) and any('(7, 7) -> (15, 15)' in ln for ln in lines)
    model = vit_flax.create_model('flexivit_small', depth=2)
    kernel = theirs.patch_embed.proj.weight.detach().numpy().transpose(2, 3, 1, 0)
    assert rel_err(params['embedding']['kernel'], kernel) < 1e-5
    x = images((2, 240, 240, 3))
    with torch.no_grad():
        y = theirs(_nchw(x)).numpy()
    assert rel_err(run_flax(model, params, x), y) < 1e-5


@pytest.mark.parametrize('torch_free', [False, True], ids=['torch', 'numpy'])
@pytest.mark.parametrize('method', ['bicubic', 'bilinear'])
@pytest.mark.parametrize('old,new', [((32, 32), (16, 16)), ((14, 14), (16, 16)), ((16, 16), (8, 12))])
def test_patch_kernel_resize_is_timms_resample_patch_embed(method, old, new, torch_free):
    from unittest import mock
    from timm.layers import resample_patch_embed
    from converters import resample
    w = torch.from_numpy(images((6, 3) + old))
    theirs = resample_patch_embed(w, list(new), interpolation=method, antialias=method == 'bicubic').numpy()
    with mock.patch.object(resample, 'available', lambda module: not torch_free):   # numpy where torch is absent
        ours = resample.resample_patch_kernel(w.numpy().transpose(2, 3, 1, 0), new, method)
    assert rel_err(ours.transpose(3, 2, 0, 1), theirs) < 1e-5


def test_deit3_own_files_read_and_write_back_for_deit3s_vit_models(tmp_path):
    """DeiT III's models_v2.py (vendored as released) saves {'model': ...} with LayerScale as gamma_1/gamma_2."""
    from unittest import mock
    import timm.models.registry
    with mock.patch.object(timm.models.registry, 'register_model', lambda fn: fn):   # keep timm's list timm's
        import deit_models_v2
    make = lambda: deit_models_v2.vit_models(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                                             mlp_ratio=4, qkv_bias=True, num_classes=10, init_scale=1e-4,
                                             block_layers=deit_models_v2.Layer_scale_init_Block,
                                             norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6))
    ref = perturb_timm(make())
    torch.save({'model': ref.state_dict()}, tmp_path / 'deit_3_small_224_1k.pth')
    x = images((2, 64, 64, 3))
    with torch.no_grad():
        y = ref(_nchw(x)).numpy()
    model, params, ck = pipeline.load_model(tmp_path / 'deit_3_small_224_1k.pth', 'deit3_small_patch16_224',
                                            embed_dim=64, depth=2, num_heads=2, img_size=64)
    assert ck.layout == 'deit3' and model.no_embed_class and model.init_values and model.num_classes == 10
    assert rel_err(run_flax(model, params, x), y) < 1e-5
    pipeline.write_flat(flatten_dict(params, sep='/'), model, tmp_path / 'back.pth', layout='deit3')
    fresh = make()
    fresh.load_state_dict(torch.load(tmp_path / 'back.pth', weights_only=True)['model'], strict=True)
    with torch.no_grad():
        assert rel_err(fresh.eval()(_nchw(x)).numpy(), y) < 1e-6


def test_dinov2_resample_method_is_dinovisiontransformers_own_interpolation(tmp_path):
    """A DINOv2 file (5x5 grid) loaded at 98 px (7x7) with resample='dinov2' computes what DinoVisionTransformer
    computes on a 98 px image: its interpolate_pos_encoding (bicubic, offset 0.1) resamples in the forward."""
    ref = _dinov2(0, 'mlp')
    torch.save(ref.state_dict(), tmp_path / 'dinov2.pth')
    x = images((2, 98, 98, 3))
    with torch.no_grad():
        y = ref(_nchw(x)).numpy()
    model, params, _ = pipeline.load_model(tmp_path / 'dinov2.pth', 'vit_small_patch14_dinov2', depth=2,
                                           img_size=98, resample='dinov2')
    assert rel_err(run_flax(model, params, x), y) < 1e-5


# ---------------------------------------------------------------- sizes no registered name has

def test_a_dinov2_swiglu_file_of_no_registered_size_converts_without_model_taking_64_wide_heads(tmp_path):
    """DINOv2 at ViT-S width with 2 SwiGLU blocks (no registered depth): the file records every size but the
    head count, which DINOv2 fixes at 64-wide heads: `convert` without --model takes 6 heads and SiLU, said on
    stderr; the logits equal DinoVisionTransformer's."""
    ref = _dinov2(4, 'swiglufused')
    torch.save(ref.state_dict(), tmp_path / 'dinov2.pth')
    r = cli('convert', tmp_path / 'dinov2.pth', tmp_path / 'out.safetensors')
    assert r.returncode == 0, r.stderr
    assert '6 heads of 64 (embed_dim=384' in r.stderr and '--set num_heads=N to change it' in r.stderr
    assert 'gated by SiLU' in r.stderr
    model, params, ck = pipeline.load_model(tmp_path / 'dinov2.pth', log=lambda s: None)
    assert (model.num_heads, model.act_layer, model.mlp_layer, model.depth) == (6, 'silu', 'swiglu_packed', 2)
    x = images((2, 70, 70, 3))
    with torch.no_grad():
        assert rel_err(run_flax(model, params, x), ref(_nchw(x)).numpy()) < 1e-5


@pytest.mark.parametrize('heads,sets', [(2, ()), (4, ('--set', 'num_heads=4'))], ids=['64-wide', 'set-32-wide'])
def test_an_open_clip_file_of_no_registered_width_converts_without_model(tmp_path, heads, sets):
    """An open_clip tower 128 wide (no registered name): 64-wide heads by the release's convention, said on
    stderr; `--set num_heads` when the file's are otherwise; the converted file computes open_clip's output."""
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    ref = perturb_timm(VisionTransformer(image_size=64, patch_size=16, width=128, layers=2, heads=heads,
                                         mlp_ratio=4.0, output_dim=32, act_layer=nn.GELU))
    torch.save(ref.state_dict(), tmp_path / 'open_clip.bin')
    r = cli('convert', tmp_path / 'open_clip.bin', tmp_path / 'out.npz', *sets)
    assert r.returncode == 0, r.stderr
    assert ('2 heads of 64 (embed_dim=128' in r.stderr) == (not sets), r.stderr
    model, params, ck = pipeline.load_model(tmp_path / 'out.npz', log=lambda s: None)
    assert (model.embed_dim, model.num_heads, model.num_classes) == (128, heads, 32)
    x = images((2, 64, 64, 3))
    with torch.no_grad():
        assert rel_err(run_flax(model, params, x), ref(_nchw(x)).numpy()) < 1e-5
