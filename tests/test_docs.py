"""The docs' model counts come from the registry: this test fails when they drift (and prints what to paste).

docs/MODELS.md holds the table `count_table()` makes, verbatim; every "N of timm's M" / "N of the M" in README.md
and docs/*.md is the ViT count against timm's. Run `python tests/test_docs.py` to print the current table.
"""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMM_MODULES = "timm's `vision_transformer`, `deit` and `vision_transformer_hybrid`"


def counts():
    """{module class name: (registered names, of them timm's)} in registration order, and (ViT names built of
    timm's, timm's ViT names)."""
    import vit_flax  # noqa: F401  (registers every model)
    from vit_flax.models.vit_timm import NOT_BUILT
    from vit_flax.registry import list_models, model_config, timm_names
    timm = set(timm_names())
    by_cls = {}
    for name in list_models():
        by_cls.setdefault(model_config(name)[0].__name__, []).append(name)
    table = {cls: (len(names), sum(n in timm for n in names)) for cls, names in by_cls.items()}
    built = table['VisionTransformer'][1]
    return table, (built, built + len(NOT_BUILT))


def count_table() -> str:
    table, (built, of) = counts()
    rows = ['| module | registered names | of them timm\'s names |', '|---|---|---|']
    for cls, (n, in_timm) in table.items():
        rest = f'`vit_flax.models.vit_timm.NOT_BUILT` names the {of - built} others' if of > built else 'every one built'
        note = f' ({built} of the {of} in {TIMM_MODULES}; {rest})' if cls == 'VisionTransformer' else ''
        rows.append(f'| `vit_flax.{cls}` | {n} | {in_timm}{note} |')
    rows.append(f'| all | {sum(n for n, _ in table.values())} | {sum(t for _, t in table.values())} |')
    return '\n'.join(rows)


def read(path):
    with open(path, encoding='utf-8') as f:
        return f.read()


def test_the_model_count_table_in_the_docs_is_the_registrys():
    want = count_table()
    assert want in read(os.path.join(ROOT, 'docs', 'MODELS.md')), \
        'docs/MODELS.md: the model counts drifted from the registry; paste this table:\n' + want


def test_every_count_against_timm_in_the_docs_is_the_registrys():
    _, (built, of) = counts()
    found = []
    for path in [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md'))):
        for m in re.finditer(r"\b(\d+) of (?:the |timm's )(\d+)\b", read(path)):
            found.append((os.path.relpath(path, ROOT), int(m.group(1)), int(m.group(2))))
    assert found and all((n, m) == (built, of) for _, n, m in found), (f'want {built} of {of}', found)


if __name__ == '__main__':
    print(count_table())
