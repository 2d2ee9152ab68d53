"""Declarative parameter maps between a Flax tree and a PyTorch state_dict.

A family's map is a list of `Rule`s: (flax paths, torch keys, transform). The same list runs in both
directions, so the inverse cannot drift from the forward map. Transforms are pure reshapes, transposes,
concatenations and splits, which makes every round trip bit-exact.

Flax paths are the '/'-joined keys of `flax.traverse_util.flatten_dict(params, sep='/')`.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from .errors import ConversionError
from .formats.mapped import release

Arrays = List[np.ndarray]


@dataclass(frozen=True)
class Transform:
    """A pair of inverse functions on lists of arrays: flax-side arrays <-> torch-side arrays."""
    name: str
    to_torch: Callable[[Arrays], Arrays]
    to_flax: Callable[[Arrays], Arrays]


@dataclass(frozen=True)
class Rule:
    flax: Tuple[str, ...]
    torch: Tuple[str, ...]
    transform: Transform


def rule(flax, torch, transform: 'Transform' = None) -> Rule:
    as_tuple = lambda v: (v,) if isinstance(v, str) else tuple(v)
    return Rule(as_tuple(flax), as_tuple(torch), transform or IDENTITY)


def _one(fn):
    return lambda arrays: [fn(arrays[0])]


IDENTITY = Transform('identity', lambda a: list(a), lambda a: list(a))
# Dense kernel (in, out) <-> Linear weight (out, in).
LINEAR = Transform('linear', _one(lambda w: w.T), _one(lambda w: w.T))


def _conv_to_torch(w):  # (*spatial, in, out) -> (out, in, *spatial); HWIO -> OIHW is transpose(3,2,0,1)
    n = w.ndim - 2
    return w.transpose((n + 1, n) + tuple(range(n)))


def _conv_to_flax(w):  # (out, in, *spatial) -> (*spatial, in, out); OIHW -> HWIO is transpose(2,3,1,0)
    n = w.ndim - 2
    return w.transpose(tuple(range(2, n + 2)) + (1, 0))


CONV = Transform('conv', _one(_conv_to_torch), _one(_conv_to_flax))


def heads_in(num_heads: int, count: int = 1, kernel: bool = True) -> Transform:
    """`count` DenseGeneral projections to (H, Dh), fused in order into one Linear ((count*H*Dh, D) or bias).

    Google stores q/k/v kernels as (D, H, Dh) and biases as (H, Dh); timm fuses them into
    `qkv.weight` (3D, D) / `qkv.bias` (3D,) in q, k, v order (and k, v into `kv` for MAP pooling).
    """
    def to_torch(arrays):
        if kernel:
            return [np.concatenate([a.reshape(a.shape[0], -1).T for a in arrays], axis=0)]
        return [np.concatenate([a.reshape(-1) for a in arrays], axis=0)]

    def to_flax(arrays):
        (w,) = arrays
        parts = np.split(w, count, axis=0)
        if kernel:
            return [p.T.reshape(p.shape[1], num_heads, -1) for p in parts]
        return [p.reshape(num_heads, -1) for p in parts]

    return Transform(f'heads_in(h={num_heads},n={count},{"kernel" if kernel else "bias"})', to_torch, to_flax)


def heads_out(num_heads: int) -> Transform:
    """DenseGeneral over (H, Dh) -> D, kernel (H, Dh, D) <-> Linear weight (D, H*Dh)."""
    return Transform(f'heads_out(h={num_heads})',
                     _one(lambda w: w.reshape(-1, w.shape[-1]).T),
                     _one(lambda w: w.T.reshape(num_heads, -1, w.shape[0])))


def norm_rules(flax: str, torch: str) -> List[Rule]:
    """LayerNorm: scale/bias <-> weight/bias."""
    return [rule(f'{flax}/scale', f'{torch}.weight'), rule(f'{flax}/bias', f'{torch}.bias')]


def dense_rules(flax: str, torch: str, bias: bool = True) -> List[Rule]:
    """Dense kernel/bias <-> Linear weight/bias."""
    rules = [rule(f'{flax}/kernel', f'{torch}.weight', LINEAR)]
    return rules + [rule(f'{flax}/bias', f'{torch}.bias')] if bias else rules


def mlp_rules(flax: str, torch: str) -> List[Rule]:
    """Google's MlpBlock (Dense_0, Dense_1) <-> timm's Mlp (fc1, fc2)."""
    return dense_rules(f'{flax}/Dense_0', f'{torch}.fc1') + dense_rules(f'{flax}/Dense_1', f'{torch}.fc2')


def attention_out_rules(flax: str, torch: str, heads: int, bias: bool = True) -> List[Rule]:
    """DenseGeneral `out` (H, Dh, D) <-> timm's `proj` Linear."""
    return [rule(f'{flax}/out/kernel', f'{torch}.weight', heads_out(heads))] + \
        ([rule(f'{flax}/out/bias', f'{torch}.bias')] if bias else [])


def map_head_rules(heads: int, norm=norm_rules) -> List[Rule]:
    """Google's `MAPHead_0` (probe, attention, LayerNorm_0, MlpBlock_0) <-> timm's `attn_pool` (latent, q, kv, proj,
    norm, mlp); `norm` the family's norm rules (a LayerNorm's by default)."""
    f, t = 'MAPHead_0', 'attn_pool'
    mha = f'{f}/MultiHeadDotProductAttention_0'
    return [rule(f'{f}/probe', f'{t}.latent'),
            rule(f'{mha}/query/kernel', f'{t}.q.weight', heads_in(heads, 1)),
            rule(f'{mha}/query/bias', f'{t}.q.bias', heads_in(heads, 1, kernel=False)),
            rule((f'{mha}/key/kernel', f'{mha}/value/kernel'), f'{t}.kv.weight', heads_in(heads, 2)),
            rule((f'{mha}/key/bias', f'{mha}/value/bias'), f'{t}.kv.bias', heads_in(heads, 2, kernel=False))] + \
        attention_out_rules(mha, f'{t}.proj', heads) + norm(f'{f}/LayerNorm_0', f'{t}.norm') + \
        mlp_rules(f'{f}/MlpBlock_0', f'{t}.mlp')


def split_rows(n: int, name: str) -> Transform:
    """One array fused along axis 0 (the flax side) <-> `n` equal arrays (the torch side): timm's fused qkv <->
    transformers' query, key, value."""
    return Transform(name, lambda a: list(np.split(a[0], n, axis=0)), lambda a: [np.concatenate(a, axis=0)])


QKV_ROWS = split_rows(3, 'qkv')


def renamed_rules(a: str, b: str, bias: bool = True) -> List[Rule]:
    """A torch module's weight (and bias) under another name: key tables between two torch layouts (timm's keys
    on the flax side, transformers' on the torch side), arrays unchanged."""
    return [rule(f'{a}.weight', f'{b}.weight')] + ([rule(f'{a}.bias', f'{b}.bias')] if bias else [])


def qkv_rules(a: str, parts: Sequence[str], bias: bool) -> List[Rule]:
    """timm's fused `a` (weight, bias) <-> the separate projections `parts` (q, k, v) of another torch layout."""
    rules = [rule(f'{a}.weight', tuple(f'{k}.weight' for k in parts), QKV_ROWS)]
    return rules + ([rule(f'{a}.bias', tuple(f'{k}.bias' for k in parts), QKV_ROWS)] if bias else [])


def _take(src: Dict[str, np.ndarray], keys: Sequence[str], side: str, used: set) -> Arrays:
    missing = [k for k in keys if k not in src]
    if missing:
        raise ConversionError(f'missing {side} key {missing[0]!r}')
    used.update(keys)
    return [np.asarray(src[k]) for k in keys]


def _run(src, rules, from_side, to_side, fn_name, ignore=()):
    used, out = set(), {}
    for r in rules:
        arrays = _take(src, getattr(r, from_side), from_side, used)
        try:
            results = getattr(r.transform, fn_name)(arrays)
        except (ValueError, IndexError) as e:
            shapes = ', '.join(f'{k} {tuple(a.shape)}' for k, a in zip(getattr(r, from_side), arrays))
            raise ConversionError(f'cannot map {shapes} through {r.transform.name}: {e}') from None
        for k, v in zip(getattr(r, to_side), results):
            out[k] = np.ascontiguousarray(v) if np.ndim(v) else np.asarray(v)   # (ascontiguousarray makes 0-d 1-d)
        release(*arrays)   # a memory-mapped source's pages are not needed again: keep memory near one copy
    extra = [k for k in src if k not in used and not any(k.endswith(s) for s in ignore)]
    if extra:
        raise ConversionError(f'unexpected {from_side} key {extra[0]!r}' +
                              (f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''))
    return out


def flax_to_torch(flat: Dict[str, np.ndarray], rules: Sequence[Rule]) -> Dict[str, np.ndarray]:
    """Flat flax params -> torch state_dict arrays (numpy). Every key on both sides must be used."""
    return _run(flat, rules, 'flax', 'torch', 'to_torch')


def torch_to_flax(state: Dict[str, np.ndarray], rules: Sequence[Rule], ignore=()) -> Dict[str, np.ndarray]:
    """Torch state_dict arrays -> flat flax params; keys ending in one of `ignore` (buffers) are skipped."""
    return _run(state, rules, 'torch', 'flax', 'to_flax', ignore)
