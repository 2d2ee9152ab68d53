"""Eva (timm eva.py) through the converters: timm's state_dicts read and written bit-exact and loaded strictly by
timm, the family detected from the keys (and a timm ViT still read as a ViT), and the `vit-flax convert` round
trip timm .pth -> .npz -> .pth."""
import numpy as np
import pytest
import timm
import torch

import vit_flax
from converters import pipeline
from converters.families import eva as eva_family, torch_family

from helpers import cli, images, perturb_timm, rel_err, run_flax, run_timm, state_np

FAMILY = eva_family.FAMILY
TOL = 1e-5
SMALL = dict(depth=2, embed_dim=64, num_heads=4, img_size=(48, 64), num_classes=5)


def timm_reduced(name, seed=0, **extra):
    model = vit_flax.create_model(name, **dict(SMALL, **extra))
    torch.manual_seed(seed)
    return model, perturb_timm(timm.create_model(name, pretrained=False, **FAMILY.timm_kwargs(model)), seed)


@pytest.mark.parametrize('name', ['eva02_base_patch14_448', 'vit_base_patch16_dinov3', 'vit_pe_core_base_patch16_224',
                                  'vit_base_patch16_rope_mixed_224', 'vit_medium_patch16_rope_reg1_gap_256'])
def test_timm_state_dict_is_detected_as_eva(name):
    _, tm = timm_reduced(name)
    assert torch_family(state_np(tm), 'x.pth') is FAMILY or name.startswith('vit_pe_core')


def test_timm_vit_and_deit3_files_stay_vit():
    for name in ('vit_tiny_patch16_224', 'deit3_small_patch16_224', 'vit_base_patch16_clip_224'):
        with torch.device('meta'):
            tm = timm.create_model(name, depth=1)
        state = {k: np.zeros(v.shape, np.float32) for k, v in tm.state_dict().items()}
        assert torch_family(state, 'x.pth') is not FAMILY, name


def test_a_pth_loads_with_its_name_and_writes_back_bit_exact(tmp_path):
    """A reduced EVA-02 (unfused q/k/v, SwiGLU with sub-LN, rope) saved by torch: read with --model, logits as
    timm's; written back as .pth, timm loads it strictly and gets the same state_dict bit for bit."""
    model, tm = timm_reduced('eva02_base_patch14_448')
    src = tmp_path / 'eva02.pth'
    torch.save(tm.state_dict(), src)
    got, params, ck = pipeline.load_model(str(src), 'eva02_base_patch14_448', **SMALL)
    assert ck.family is FAMILY and got == model
    x = images((2,) + tuple(model.input_shape))
    assert rel_err(run_flax(model, params, x), run_timm(tm, x)) <= TOL
    pipeline.save_params(params, str(tmp_path / 'back.pth'), 'eva02_base_patch14_448', **SMALL)
    back = torch.load(tmp_path / 'back.pth', map_location='cpu', weights_only=True)
    ref = tm.state_dict()
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)
    tm.load_state_dict(back, strict=True)


def test_a_dinov3_file_of_registered_sizes_is_read_without_a_name(tmp_path):
    """A timm DINOv3 ViT-S/16 (q/v bias) at its registered sizes: detected from the keys alone, no --model."""
    name = 'vit_small_patch16_dinov3_qkvb'
    with torch.device('meta'):   # the keys and shapes are what detection reads: zeros, no init drawn
        tm = timm.create_model(name)
    src = tmp_path / 'dinov3.pth'
    torch.save({k: torch.zeros(v.shape) for k, v in tm.state_dict().items()}, src)
    model, params, ck = pipeline.load_model(str(src))
    assert ck.family is FAMILY and ck.model_name == name
    assert (model.embed_dim, model.depth, model.reg_tokens, model.qkv_bias) == (384, 12, 4, True)


def test_convert_cli_round_trip(tmp_path):
    """`vit-flax convert` timm .pth -> .npz -> .pth: the same state_dict bit for bit."""
    model, tm = timm_reduced('vit_base_patch16_sapiens2', num_kv_heads=(4, 2))
    src = tmp_path / 'sap.pth'
    torch.save(tm.state_dict(), src)
    sets = [f'--set={k}={v}' for k, v in dict(depth=2, embed_dim=64, num_heads=4, num_classes=5).items()]
    r = cli('convert', src, tmp_path / 'sap.npz', '--model', 'vit_base_patch16_sapiens2', *sets,
            '--set=num_kv_heads=4,2')
    assert r.returncode == 0, r.stderr
    r = cli('convert', tmp_path / 'sap.npz', tmp_path / 'back.pth', '--model', 'vit_base_patch16_sapiens2', *sets,
            '--set=num_kv_heads=4,2')
    assert r.returncode == 0, r.stderr
    back = torch.load(tmp_path / 'back.pth', map_location='cpu', weights_only=True)
    ref = tm.state_dict()
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)


# ---------------------------------------------------------------- DINOv3's own files (facebookresearch/dinov3)

def dinov3_release(seed=0, **kw):
    """tests/reference/dinov3_vit.py (our re-implementation of DINOv3's code: its keys and computation), every
    weight moved off its init; the k third of qkv.bias left nonzero, as bias_mask zeroes it."""
    from reference import dinov3_vit
    torch.manual_seed(seed)
    ref = perturb_timm(dinov3_vit.DinoV3(**kw), seed)
    for blk in ref.blocks:
        if blk.attn.qkv.bias is not None:
            d = blk.attn.qkv.bias.shape[0] // 3
            blk.attn.qkv.bias_mask[d:2 * d] = 0
    return ref


@pytest.mark.parametrize('kw,name', [(dict(), 'vit_base_patch16_dinov3_qkvb'),
                                     (dict(qkv_bias=False, ffn_ratio=3.0, swiglu_align=64), 'vit_7b_patch16_dinov3')])
def test_dinov3_hub_file_reads_and_writes_back_for_dinov3s_code(tmp_path, kw, name):
    """A DINOv3 hub state_dict (storage_tokens, rope_embed.periods, ls1.gamma, mask_token, bias_mask): read with
    --model (and the reduced sizes), the class token as DINOv3's code's normed class token; written back with
    --layout dinov3, DINOv3's model loads it strictly and computes the same."""
    ref = dinov3_release(**kw).eval()
    src = tmp_path / 'dinov3_vit.pth'
    torch.save(ref.state_dict(), src)
    sizes = dict(depth=2, embed_dim=64, num_heads=4, img_size=(48, 64))
    notes = []
    model, params, ck = pipeline.load_model(str(src), name, log=notes.append, **sizes)
    assert ck.layout == 'dinov3' and model.global_pool == 'token' and 'mask_token' in '\n'.join(notes)
    x = images((2, 48, 64, 3))
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert rel_err(run_flax(model, params, x), want[:, 0]) <= TOL
    tokens = run_flax(model.clone(global_pool=''), params, x)
    assert rel_err(tokens, want) <= TOL
    pipeline.save_params(params, str(tmp_path / 'back.pth'), name, layout='dinov3', global_pool='token', **sizes)
    back = torch.load(tmp_path / 'back.pth', map_location='cpu', weights_only=True)
    again = dinov3_release(seed=1, **kw).eval()
    again.load_state_dict(back, strict=True)
    with torch.no_grad():
        assert rel_err(again(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy(), want) <= TOL


# ---------------------------------------------------------------- Perception Encoder's own files

@pytest.mark.parametrize('name', ['vit_pe_core_base_patch16_224',
                                  pytest.param('vit_pe_lang_large_patch14_448', marks=pytest.mark.slow)])
def test_pe_files_read_and_write_as_timms_convert_pe_reads_them(tmp_path, name):
    """A PE vision tower (perception_models' keys, under `visual.` as in a CLIP checkpoint): written with
    --layout pe from timm's weights, timm's own `_convert_pe` turns it back into timm's state_dict bit for bit
    (and timm loads that strictly); read by the converters, logits as timm's."""
    from timm.models.eva import _convert_pe
    model, tm = timm_reduced(name)
    with torch.no_grad():
        if tm.num_classes:
            tm.head.bias.zero_()   # PE's projection has no bias
    ref = tm.state_dict()
    params = pipeline.load_model(_save(tmp_path / 'timm.pth', ref), name, **SMALL)[1]
    pipeline.save_params(params, str(tmp_path / 'pe.pth'), name, layout='pe', **SMALL)
    pe = torch.load(tmp_path / 'pe.pth', map_location='cpu', weights_only=True)
    assert 'conv1.weight' in pe and 'transformer.resblocks.0.attn.in_proj_weight' in pe
    visual = {'visual.' + k: v for k, v in pe.items()}
    got = _convert_pe(visual, tm)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    tm.load_state_dict(got, strict=True)
    notes = []
    model2, params2, ck = pipeline.load_model(_save(tmp_path / 'clip.pth', visual), name, log=notes.append, **SMALL)
    assert ck.layout == 'pe' and 'pe layout' in '\n'.join(notes)
    x = images((2,) + tuple(model.input_shape))
    assert rel_err(run_flax(model2, params2, x), run_timm(tm, x)) <= TOL


def _save(path, state):
    torch.save(state, path)
    return str(path)


# ---------------------------------------------------------------- EVA-02's own files (baaivision/EVA)

def _eva02_original(state, mim=False):
    """timm's keys spelled as EVA-02's release spells them (the inverse of timm's checkpoint_filter_fn), with the
    release's persistent RoPE buffers; a MIM file adds mask_token and lm_head and names fc_norm `norm`."""
    out = {}
    for k, v in state.items():
        k = (k.replace('attn.q_proj.bias', 'attn.q_bias').replace('attn.v_proj.bias', 'attn.v_bias')
             .replace('mlp.norm', 'mlp.ffn_ln').replace('attn.norm', 'attn.inner_attn_ln')
             .replace('mlp.fc1_g', 'mlp.w1').replace('mlp.fc1_x', 'mlp.w2').replace('mlp.fc2', 'mlp.w3')
             .replace('mlp.fc1', 'mlp.w12'))
        if mim and k.startswith('fc_norm.'):
            k = k[len('fc_'):]
        out[k] = v
    out['rope.freqs_cos'] = out['rope.freqs_sin'] = torch.ones(12, 16)
    if mim:
        out['mask_token'] = torch.zeros(1, 1, 64)
        out['lm_head.weight'], out['lm_head.bias'] = torch.zeros(8, 64), torch.zeros(8)
    return out


@pytest.mark.parametrize('name,mim', [pytest.param('eva02_base_patch14_448', False, marks=pytest.mark.slow),
                                      ('eva02_tiny_patch14_224', True)])
def test_eva02_release_files_read_as_timms_filter_reads_them(tmp_path, name, mim):
    """An EVA-02 release file (separate q/k/v and SwiGLU with sub-LN; packed SwiGLU and a MIM head): read by the
    converters, the logits of timm's model loaded through timm's own checkpoint_filter_fn."""
    from timm.models.eva import checkpoint_filter_fn
    model, tm = timm_reduced(name, num_classes=0 if mim else 5)
    original = _eva02_original(tm.state_dict(), mim)
    tm.load_state_dict(checkpoint_filter_fn(dict(original), tm), strict=True)
    torch.save(original, tmp_path / 'eva02.pth')
    got, params, ck = pipeline.load_model(str(tmp_path / 'eva02.pth'), name, **dict(SMALL, num_classes=model.num_classes))
    assert ck.layout == 'eva02'
    x = images((2,) + tuple(model.input_shape))
    assert rel_err(run_flax(got, params, x), run_timm(tm.eval(), x)) <= TOL


def test_sapiens2_files_read_and_write_as_timms_filter_reads_them(tmp_path):
    """Sapiens2's own keys (storage_tokens, wq/wk/wv, attn.gamma, ffn.w12/w3, ln1/ln2): written with
    --layout sapiens2, timm's checkpoint_filter_fn gives back timm's state_dict bit for bit; read back (with a
    mask_token, dropped), logits as timm's."""
    from timm.models.eva import checkpoint_filter_fn
    name = 'vit_base_patch16_sapiens2'
    model, tm = timm_reduced(name, num_kv_heads=(4, 2), num_classes=0)
    ref = tm.state_dict()
    sizes = dict(SMALL, num_kv_heads=(4, 2), num_classes=0)
    torch.save(ref, tmp_path / 'timm.pth')
    params = pipeline.load_model(str(tmp_path / 'timm.pth'), name, **sizes)[1]
    pipeline.save_params(params, str(tmp_path / 'sap.pth'), name, layout='sapiens2', **sizes)
    sap = torch.load(tmp_path / 'sap.pth', map_location='cpu', weights_only=True)
    assert 'storage_tokens' in sap and 'blocks.0.attn.wq.weight' in sap and 'blocks.0.attn.gamma.weight' in sap
    got = checkpoint_filter_fn(dict(sap), tm)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    sap['mask_token'] = torch.zeros(1, 64)
    torch.save(sap, tmp_path / 'sap_mask.pth')
    got_model, got_params, ck = pipeline.load_model(str(tmp_path / 'sap_mask.pth'), name, **sizes)
    assert ck.layout == 'sapiens2'
    x = images((2,) + tuple(model.input_shape))
    assert rel_err(run_flax(got_model, got_params, x), run_timm(tm, x)) <= TOL


def test_dinov3_release_files_without_a_name(tmp_path):
    """Without --model: a DINOv3 ViT-S/16 hub file takes a DINOv3 name (not LingBot's of the same sizes) with the
    class token pooled; one whose q/v biases are all zero (the distilled releases) the name without biases; one of
    no registered size 64-wide heads, said on stderr."""
    from reference import dinov3_vit
    cases = [(dict(dim=384, depth=12, heads=6), False, 'vit_small_patch16_dinov3_qkvb'),
             (dict(dim=384, depth=12, heads=6), True, 'vit_small_patch16_dinov3'),
             (dict(dim=128, depth=2, heads=2), False, None)]
    for kw, zero, want in cases:
        with torch.device('meta'):
            ref = dinov3_vit.DinoV3(**kw)
        state = {k: torch.zeros(v.shape) if zero or 'qkv.bias' not in k else torch.ones(v.shape)
                 for k, v in ref.state_dict().items()}
        torch.save(state, tmp_path / 'd.pth')
        notes = []
        model, params, ck = pipeline.load_model(str(tmp_path / 'd.pth'), log=notes.append)
        assert ck.layout == 'dinov3' and model.global_pool == 'token' and model.qkv_bias == (not zero)
        if want:
            assert ck.model_name == want
        else:
            assert model.num_heads == 2 and '64' in '\n'.join(notes), notes
