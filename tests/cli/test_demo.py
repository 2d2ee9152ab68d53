"""`make demo`'s converter half, on a 2-block ViT-Ti: every line says what it proves, in words."""
import re

from vit_flax_cli import demo


def test_demo_lines_say_what_each_proves(tmp_path, capfd):
    demo.main(['--model', 'vit_tiny_patch16_224', '--depth', '2', '--epochs', '0', '--batch', '2', '--out', str(tmp_path)])
    out = capfd.readouterr().out
    lines = {l[:3]: l for l in out.splitlines() if re.match(r'\[\d\]', l)}
    assert sorted(lines) == ['[1]', '[2]', '[3]', '[4]', '[5]'], out
    import timm
    params = sum(p.numel() for p in timm.create_model('vit_tiny_patch16_224', depth=2).parameters())
    assert f'{params:,} params' in lines['[1]'] and 'as timm counts them' in lines['[1]']
    assert 'random weights (not pretrained' in lines['[2]'] and 'Google .npz' in lines['[2]']
    assert 'strict=True' in lines['[4]'] and 'the same class for 2 of 2' in lines['[4]']
    assert 'the weights are random' in lines['[4]'] and 'argmax' not in out
    assert 'PASS' in out and 'within 1e-4' in lines['[5]']
