"""vit_train's parts in-process: data sets (CIFAR archives, folders, WZMIAOMIAO's split), the pickle guard, the
grain pipeline's sharding and resumption, the masks (weight decay, freezing), mesh parsing, grad accumulation."""
import io
import os
import pickle
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import vit_flax
from vit_train import data, optim, sharding, step as steps
from vit_train.errors import TrainError

from reference import wzmiaomiao


# ---------------------------------------------------------------- CIFAR archives made here

def _cifar_arrays(n, classes, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, classes, n)


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING opcodes), as the original CIFAR batches were written."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + n.to_bytes(4, 'little'))
                   + obj)
        self.memoize(obj)
    dispatch[bytes] = save_bytes


def _py2_pickle(obj) -> bytes:
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue().replace(b'numpy._core.multiarray', b'numpy.core.multiarray')  # numpy 1.x names


def _write_cifar(root, which, version, protocol='py2', n_test=6):
    """A small CIFAR archive in the official layout; returns (train images NHWC, labels, test..., names)."""
    ten = which == 'cifar10'
    classes = 10 if ten else 100
    names = [f'class{i}' for i in range(classes)]
    parts = [_cifar_arrays(n, classes, i) for i, n in enumerate((3, 2, 4, 1, 2) if ten else (12,))]
    test = _cifar_arrays(n_test, classes, 99)
    dump = _py2_pickle if protocol == 'py2' else (lambda o: pickle.dumps(o, protocol=protocol))
    if version == 'bin':
        d = root / ('cifar-10-batches-bin' if ten else 'cifar-100-binary')
        d.mkdir(parents=True)

        def records(x, y):
            lab = y.astype(np.uint8)[:, None] if ten else np.stack([y // 5, y], 1).astype(np.uint8)
            return np.concatenate([lab, x.reshape(len(x), -1)], 1).tobytes()
        if ten:
            for i, (x, y) in enumerate(parts):
                (d / f'data_batch_{i + 1}.bin').write_bytes(records(x, y))
            (d / 'test_batch.bin').write_bytes(records(*test))
            (d / 'batches.meta.txt').write_text('\n'.join(names) + '\n\n')
        else:
            (d / 'train.bin').write_bytes(records(*parts[0]))
            (d / 'test.bin').write_bytes(records(*test))
            (d / 'fine_label_names.txt').write_text('\n'.join(names) + '\n')
    else:
        d = root / ('cifar-10-batches-py' if ten else 'cifar-100-python')
        d.mkdir(parents=True)
        key = b'labels' if ten else b'fine_labels'

        def batch(x, y):
            return {b'batch_label': b'batch', key: [int(v) for v in y], b'data': x.reshape(len(x), -1),
                    b'filenames': [b'f%d.png' % i for i in range(len(y))]}
        if ten:
            for i, (x, y) in enumerate(parts):
                (d / f'data_batch_{i + 1}').write_bytes(dump(batch(x, y)))
            (d / 'test_batch').write_bytes(dump(batch(*test)))
            (d / 'batches.meta').write_bytes(dump({b'label_names': [n.encode() for n in names], b'num_vis': 3072}))
        else:
            (d / 'train').write_bytes(dump(batch(*parts[0])))
            (d / 'test').write_bytes(dump(batch(*test)))
            (d / 'meta').write_bytes(dump({b'fine_label_names': [n.encode() for n in names],
                                           b'coarse_label_names': [b'c%d' % i for i in range(20)]}))
    xtr = np.concatenate([x for x, _ in parts]).transpose(0, 2, 3, 1)
    ytr = np.concatenate([y for _, y in parts])
    return d, xtr, ytr, test[0].transpose(0, 2, 3, 1), test[1], names


@pytest.mark.parametrize('which', ['cifar10', 'cifar100'])
@pytest.mark.parametrize('version,protocol', [('bin', None), ('py', 'py2'), ('py', 2), ('py', 5)])
def test_cifar_archives(tmp_path, which, version, protocol):
    d, xtr, ytr, xte, yte, names = _write_cifar(tmp_path, which, version, protocol)
    for path in (tmp_path, d):                       # the folder holding the archive's directory, or it
        ds = data.load(which, str(path), 0.2)
        assert ds.class_names == names
        np.testing.assert_array_equal(ds.train.images, xtr)
        np.testing.assert_array_equal(ds.train.labels, ytr)
        np.testing.assert_array_equal(ds.val.images, xte)
        np.testing.assert_array_equal(ds.val.labels, yte)
    tgz = tmp_path / 'archive.tar.gz'                # the downloaded .tar.gz, read in place
    with tarfile.open(tgz, 'w:gz') as t:
        t.add(d, arcname=d.name)
    ds = data.load(which, str(tgz), 0.2)
    np.testing.assert_array_equal(ds.train.images, xtr)
    np.testing.assert_array_equal(ds.val.labels, yte)


def test_cifar_errors(tmp_path):
    with pytest.raises(TrainError, match='no cifar10 archive here'):
        data.load('cifar10', str(tmp_path), 0.2)
    d, *_ = _write_cifar(tmp_path, 'cifar10', 'bin')
    (d / 'test_batch.bin').write_bytes(b'\x00' * 100)
    with pytest.raises(TrainError, match='test_batch.bin: 100 bytes is not a whole number of 3073-byte'):
        data.load('cifar10', str(tmp_path), 0.2)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    raw = pickle.dumps({b'data': np.zeros((1, 3072), np.uint8), b'labels': [0], b'x': _Evil(marker)}, protocol=2)
    with pytest.raises(TrainError, match=r'refused to load (posix|os|nt)\.system'):
        data.safe_unpickle(raw, 'batch')
    assert not marker.exists()
    (tmp_path / 'cifar-10-batches-py').mkdir()
    for name in ['data_batch_%d' % i for i in range(1, 6)] + ['test_batch', 'batches.meta']:
        (tmp_path / 'cifar-10-batches-py' / name).write_bytes(raw)
    with pytest.raises(TrainError, match='data_batch_1: refused to load'):
        data.load('cifar10', str(tmp_path), 0.2)
    assert not marker.exists()
    # other objects are refused too, and object arrays (which need pickle for their items)
    for obj in (np.array([1, 'a'], dtype=object), {'f': np.float64}, [tarfile.TarFile]):
        with pytest.raises(TrainError, match='refused'):
            data.safe_unpickle(pickle.dumps(obj, protocol=2))
    assert data.safe_unpickle(pickle.dumps({'a': [1, 2.5, b'x', 'y', (None, True)]})) == \
        {'a': [1, 2.5, b'x', 'y', (None, True)]}


# ---------------------------------------------------------------- folders and WZMIAOMIAO's split

def _images(root, layout, rng):
    from PIL import Image
    for cls, n in layout.items():
        os.makedirs(root / cls, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).save(
                root / cls / f'{rng.integers(1e6):06d}{"_a.png" if i % 3 else ".jpg"}')


@pytest.mark.parametrize('val_rate', [0.2, 0.35])
def test_folder_split_is_wzmiaomiaos(tmp_path, val_rate):
    _images(tmp_path, {'tulips': 17, 'daisy': 11, 'roses': 6}, np.random.default_rng(1))
    tr, trl, va, val, json_str = wzmiaomiao.read_split_data(str(tmp_path), val_rate)
    ds = data.load('folder', str(tmp_path), val_rate)
    assert (ds.train.paths, ds.train.labels.tolist(), ds.val.paths, ds.val.labels.tolist()) == (tr, trl, va, val)
    from converters.formats import training_ckpt
    training_ckpt.write_class_indices(str(tmp_path / 'ci.json'), ds.class_names)
    assert (tmp_path / 'ci.json').read_text() == json_str


def test_folder_with_train_and_val_subfolders(tmp_path):
    rng = np.random.default_rng(2)
    _images(tmp_path / 'train', {'cat': 3, 'dog': 4}, rng)
    _images(tmp_path / 'val', {'cat': 2, 'dog': 1}, rng)
    ds = data.load('folder', str(tmp_path), 0.2)
    assert ds.class_names == ['cat', 'dog'] and len(ds.train) == 7 and len(ds.val) == 3
    assert ds.val.labels.tolist() == [0, 0, 1] and all('/val/' in p for p in ds.val.paths)
    _images(tmp_path / 'val', {'eel': 1}, rng)
    with pytest.raises(TrainError, match="class folder 'eel' has no counterpart"):
        data.load('folder', str(tmp_path), 0.2)


def test_unreadable_image_is_a_counted_zero_weight_row(tmp_path):
    _images(tmp_path, {'a': 3, 'b': 3}, np.random.default_rng(3))
    (tmp_path / 'b' / 'zz_truncated.png').write_bytes((tmp_path / 'a' / os.listdir(tmp_path / 'a')[0])
                                                      .read_bytes()[:40])
    paths = sorted(str(tmp_path / c / f) for c in 'ab' for f in os.listdir(tmp_path / c))
    source = data.FileSource(paths, [0] * 7)
    tf = data.EvalTransform(8, 'bilinear', 0.875)
    batches = list(data.eval_batches(source, tf, batch=4, process_index=0, process_count=1))
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert rows['image'].shape == (8, 8, 8, 3) and rows['image'].dtype == np.uint8
    assert rows['unreadable'].tolist() == [0, 0, 0, 0, 0, 0, 1, 0]        # the truncated file, by name order
    assert rows['weight'].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]            # ... and the padding row
    assert not rows['image'][6].any()


# ---------------------------------------------------------------- the grain pipeline

N, B = 43, 8  # 5 steps per epoch, 3 images left out of each epoch


def _digits_pipeline(**kw):
    src = data.ArraySource(np.random.default_rng(0).integers(0, 256, (N, 8, 8), dtype=np.uint8), np.arange(N))
    tf = data.TrainTransform(16, 'bilinear', (0.5, 1.0), hflip=True)
    return data.train_iterator(src, tf, batch=B, seed=3, **kw)


def test_processes_share_each_global_batch_and_resume_continues_the_order():
    one = _digits_pipeline(process_index=0, process_count=1)
    two = [_digits_pipeline(process_index=p, process_count=2) for p in range(2)]
    spe = N // B
    for step in range(spe + 2):                    # across the epoch boundary (a new shuffle)
        b = next(one)
        halves = [next(t) for t in two]
        for k in b:
            np.testing.assert_array_equal(b[k], np.concatenate([h[k] for h in halves]), err_msg=f'{k} {step}')
    # the saved iterator state and the step-positioned pipeline both continue where the run stopped
    state = one.get_state()
    want = [next(one)['label'] for _ in range(3)]
    fresh = _digits_pipeline(process_index=0, process_count=1)
    fresh.set_state(state)
    assert all(np.array_equal(a, next(fresh)['label']) for a in want)
    skipped = _digits_pipeline(process_index=0, process_count=1, start_step=spe + 2)
    assert all(np.array_equal(a, next(skipped)['label']) for a in want)
    # an epoch holds each image at most once (labels are the indices here); the next one is another order
    it = _digits_pipeline(process_index=0, process_count=1)
    epochs = [np.concatenate([next(it)['label'] for _ in range(spe)]) for _ in range(2)]
    assert all(len(set(e)) == spe * B for e in epochs) and set(epochs[0]) != set(epochs[1])


def test_random_resized_crop_stays_inside_and_covers_the_scale():
    rng = np.random.default_rng(0)
    for h, w in [(8, 8), (20, 31), (300, 40)]:
        for _ in range(200):
            top, left, ch, cw = data.random_resized_crop(h, w, (0.08, 1.0), (3 / 4, 4 / 3), rng)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
    # a 300x40 image fails the ten tries for large areas: the fallback is the widest centred crop in ratio
    assert data.random_resized_crop(300, 40, (0.99, 1.0), (3 / 4, 4 / 3), rng) == (123, 0, 53, 40)


# ---------------------------------------------------------------- masks: weight decay and freezing

NO_DECAY = ('bias', 'scale', 'pos_embedding', 'cls', 'dist', 'relative_position_bias_table')


@pytest.mark.parametrize('name,kw', [('deit_tiny_distilled_patch16_224', dict(img_size=32, depth=1)),
                                     ('swin_tiny_patch4_window7_224', dict(img_size=56, depths=(1, 1, 1, 1)))])
def test_weight_decay_only_on_kernels(name, kw):
    model = vit_flax.create_model(name, num_classes=5, **kw)
    shapes = flatten_dict(jax.eval_shape(lambda: vit_flax.init_params(model)), sep='/')
    rng = np.random.default_rng(0)
    flat = {k: rng.uniform(0.5, 1.5, v.shape).astype(np.float32) for k, v in shapes.items()}  # all non-zero
    lr, wd = 0.1, 0.3
    for opt in optim.OPTIMIZERS:
        tx = optim.make(opt, wd, {k: optim.decays(k) for k in flat})
        zeros = {k: np.zeros_like(v) for k, v in flat.items()}
        new = jax.jit(lambda g, p: optim.apply(tx, g, tx.init(p), p, lr)[0])(zeros, flat)
        seen = set()
        for k, n in new.items():
            u = np.asarray(n) - flat[k]
            if k.endswith('kernel'):
                np.testing.assert_allclose(u, -lr * wd * flat[k], rtol=1e-5, atol=1e-7, err_msg=f'{opt} {k}')
            else:
                assert k.rsplit('/', 1)[-1] in NO_DECAY, k
                assert not u.any(), f'{opt} {k}'              # untouched: no decay at all
                seen.add(k.rsplit('/', 1)[-1])
        assert seen == ({'bias', 'scale', 'relative_position_bias_table'} if 'swin' in name
                        else {'bias', 'scale', 'pos_embedding', 'cls', 'dist'})


def test_freeze_keeps_only_the_heads_trainable():
    model = vit_flax.create_model('vit_tiny_patch16_224', img_size=32, depth=1, representation_size=16)
    flat = flatten_dict(jax.eval_shape(lambda: vit_flax.init_params(model)), sep='/')
    assert optim.trainable_keys(flat, True) == ['head/bias', 'head/kernel', 'pre_logits/bias', 'pre_logits/kernel']
    assert optim.trainable_keys(flat, False) == sorted(flat)
    with pytest.raises(TrainError, match='no head'):
        optim.trainable_keys({k: v for k, v in flat.items() if not k.startswith(('head', 'pre'))}, True)


# ---------------------------------------------------------------- mesh, FSDP rule, grad accumulation

def test_mesh_parsing_and_fsdp_rule():
    assert sharding.parse_mesh('', 8) == {'data': 8, 'fsdp': 1}
    assert sharding.parse_mesh('data=2,fsdp=4', 8) == {'data': 2, 'fsdp': 4}
    assert sharding.parse_mesh('fsdp=2', 8) == {'data': 4, 'fsdp': 2}
    assert sharding.parse_mesh('fsdp=-1', 8) == {'data': 1, 'fsdp': 8}
    for bad, msg in [('data=3', 'uses 3 devices'), ('model=2', "unknown axis 'model'"), ('data=x', 'integer'),
                     ('fsdp=3', 'do not split')]:
        with pytest.raises(TrainError, match=msg):
            sharding.parse_mesh(bad, 8)
    P = jax.sharding.PartitionSpec
    assert sharding.fsdp_spec((768, 3072), 4) == P(None, 'fsdp')     # the largest divisible dimension
    assert sharding.fsdp_spec((3072, 768), 4) == P('fsdp', None)
    assert sharding.fsdp_spec((768, 12, 64), 8) == P('fsdp', None, None)
    assert sharding.fsdp_spec((1001, 768), 4) == P(None, 'fsdp')      # 1001 does not divide
    assert sharding.fsdp_spec((768,), 4) == P()                        # small: replicated
    assert sharding.fsdp_spec((768, 3072), 1) == P()


@pytest.mark.slow  # two compilations of a train step: ~40 s on the shared 2-core machine
def test_grad_accumulation_matches_one_big_batch():
    model = vit_flax.create_model('vit_tiny_patch16_224', img_size=16, patch_size=8, depth=1, num_classes=10)
    flat = flatten_dict(vit_flax.init_params(model, jax.random.PRNGKey(1)), sep='/')
    keys = sorted(flat)
    tx = optim.make('sgd', 0.0, {k: False for k in keys})  # linear in the gradient, unlike Adam with ~0 gradients
    rng = np.random.default_rng(0)
    batch = dict(image=rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8), label=rng.integers(0, 10, 16),
                 weight=np.r_[np.ones(15), 0.0].astype(np.float32), unreadable=np.zeros(16, np.int32))
    out = []
    for accum in (1, 4):
        fn = jax.jit(steps.make_train_step(model, tx, keys, mean=(0.5,) * 3, std=(0.5,) * 3, grad_accum=accum))
        params = flatten_dict(vit_flax.init_params(model, jax.random.PRNGKey(1)))
        from flax.traverse_util import unflatten_dict
        state = dict(params=unflatten_dict(params), opt_state=tx.init(flat), step=jnp.int32(0))
        for _ in range(2):
            state, metrics = fn(state, batch, 0.1)
        out.append((flatten_dict(state['params'], sep='/'), metrics))
    (p1, m1), (p4, m4) = out
    assert float(m1['count']) == float(m4['count']) == 15.0
    np.testing.assert_allclose(float(m4['loss']), float(m1['loss']), rtol=1e-5)
    for k in p1:
        np.testing.assert_allclose(np.asarray(p4[k]), np.asarray(p1[k]), atol=1e-6, err_msg=k)
    assert any(not np.allclose(np.asarray(p1[k]), np.asarray(flat[k])) for k in p1)   # it did train


@pytest.mark.slow  # spawning grain's worker processes (each imports jax) takes ~30 s on the shared machine
def test_worker_processes_give_the_same_batches_and_resume(tmp_path):
    _images(tmp_path, {'a': 12, 'b': 12}, np.random.default_rng(4))
    ds = data.load('folder', str(tmp_path), 0.2)
    tf = data.TrainTransform(8, 'bilinear', (0.3, 1.0), hflip=True)

    def pipeline(workers):
        return data.train_iterator(ds.train, tf, batch=4, seed=1, process_index=0, process_count=1, workers=workers)
    threads, procs = pipeline(0), pipeline(2)
    try:
        for _ in range(3):
            a, b = next(threads), next(procs)
            for k in a:
                np.testing.assert_array_equal(a[k], np.asarray(b[k]), err_msg=k)
        state = procs.get_state()
        want = [next(threads)['image'] for _ in range(2)]
    finally:
        procs.close()
    resumed = pipeline(2)
    try:
        resumed.set_state(state)
        for w in want:
            np.testing.assert_array_equal(w, np.asarray(next(resumed)['image']))
    finally:
        resumed.close()


# ---------------------------------------------------------------- the command line

def _resolved(tmp_path, *argv):
    from vit_train import config
    return config.resolve(config.build_parser().parse_args([*argv, '--workdir', str(tmp_path / 'w')]))


def test_without_model_each_dataset_gets_its_own_default_and_says_so(tmp_path, capsys):
    """The tiny demo ViT is the digits demo's only; photos get ViT-S/16 at 224, CIFAR ViT-S with 4x4 patches at 32."""
    from vit_train import main
    picked = lambda a: (a.model, a.img_size, a.patch_size, a.depth)  # noqa: E731
    assert picked(_resolved(tmp_path)) == ('vit_tiny_patch16_224', 16, 8, 4)
    assert picked(_resolved(tmp_path, '--data-path', 'photos')) == ('vit_small_patch16_224', None, None, None)
    assert picked(_resolved(tmp_path, '--dataset', 'cifar100', '--data-path', 'c')) == ('vit_small_patch16_224', 32, 4, None)
    assert picked(_resolved(tmp_path, '--data-path', 'p', '--img-size', '96')) == ('vit_small_patch16_224', 96, None, None)
    assert picked(_resolved(tmp_path, '--model', 'deit_tiny_patch16_224', '--data-path', 'p')) == \
        ('deit_tiny_patch16_224', None, None, None)
    assert _resolved(tmp_path, '--model', 'deit_tiny_patch16_224').default_model is None
    # the choice is the first line of the run (here the run stops at the missing folder, before any model is built)
    for argv, line in [
            (['--dataset', 'folder', '--data-path', str(tmp_path / 'photos')],
             'model: vit_small_patch16_224 at 224 (default for --dataset folder; pass --model to choose)'),
            (['--dataset', 'cifar10', '--data-path', str(tmp_path / 'c')],
             'model: vit_small_patch16_224 with patch_size=4 at 32 (default for --dataset cifar10; pass --model to choose)')]:
        assert main([*argv, '--workdir', str(tmp_path / 'w')]) == 1
        out, err = capsys.readouterr()
        assert out.splitlines() == [line] and 'no such' in err, (out, err)
    # and timm builds the CIFAR default as it is recorded (the same parameter count)
    import timm
    t = timm.create_model('vit_small_patch16_224', img_size=32, patch_size=4, num_classes=10)
    model = vit_flax.create_model('vit_small_patch16_224', img_size=32, patch_size=4, num_classes=10)
    shapes = jax.eval_shape(lambda: vit_flax.init_params(model))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == sum(p.numel() for p in t.parameters())


def test_every_training_flag_has_help_that_states_its_default():
    from vit_train import config
    parser = config.build_parser()
    missing = [a.option_strings[-1] for a in parser._actions
               if a.option_strings and a.dest != 'help' and 'default' not in (a.help or '')]
    assert not missing, missing
    text = ' '.join(config.build_parser().format_help().split())
    for option, default in [('--epochs EPOCHS', 'default 10'), ('--optimizer {sgd,adamw}', 'default adamw'),
                            ('--seed SEED', 'default 0'), ('--label-smoothing SMOOTHING', 'default 0')]:
        assert default in text.split(option)[-1].split(' --', 1)[0], option


def test_steps_are_placed_in_their_epoch_as_the_epoch_lines_count():
    """Epoch 1 of 5 steps ends at step 5 (its epoch line says 'step 5'): step 16 of 8-step epochs is in epoch 2,
    step 16 of 5-step epochs in epoch 4; a checkpoint at an epoch end continues with the next epoch's first step."""
    from vit_train import report
    assert report.where(16, 8, 5) == 'step 16 of 40 (the end of epoch 2 of 5)'
    assert report.where(16, 5, 5) == 'step 16 of 25 (epoch 4 of 5, step 1 of 5 in it)'
    assert report.where(13, 8, 2) == 'step 13 of 16 (epoch 2 of 2, step 5 of 8 in it)'
    assert report.where(0, 8, 2) == 'step 0 of 16 (before epoch 1)'
    assert report.resumed(16, 8, 5) == ('resumed from the checkpoint of step 16 of 40 (the end of epoch 2 of 5); '
                                        'continuing with step 17, the first of epoch 3')
    assert report.resumed(14, 8, 5) == ('resumed from the checkpoint of step 14 of 40 (epoch 2 of 5, step 6 of 8 '
                                        'in it); continuing with step 15')


def test_model_flags_a_model_cannot_take_are_one_line_errors(tmp_path, capsys):
    """A flag the family has no field for names the flag; a configuration the model refuses is bad input (exit 1),
    not an internal error."""
    from vit_train import main
    for argv, line in [
            (['--model', 'swin_tiny_patch4_window7_224', '--depth', '2'],
             'train_flax.py: error: --depth 2: swin_tiny_patch4_window7_224 (a SwinTransformer) has no depth field'),
            (['--model', 'lucid_vit_tiny_patch16_224', '--img-size', '20'],
             'img_size 20 is not a multiple of the patch 16'),
            (['--model', 'vit_smal_patch16_224'],
             "train_flax.py: error: --model vit_smal_patch16_224: unknown model 'vit_smal_patch16_224'; "
             'similar: vit_small_patch16_224')]:
        assert main([*argv, '--epochs', '1', '--workdir', str(tmp_path / 'w')]) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith('train_flax.py: error: ') and line in err and len(err.splitlines()) == 1, err
