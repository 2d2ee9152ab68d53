"""`vit-flax data pack SRC DST`: pack an image folder, CIFAR archives or a Hugging Face datasets folder /
Parquet files into ArrayRecord shards that `train_flax.py --data-path DST` reads (vit_train.pack)."""
import argparse

from converters.errors import ConversionError


def add_parser(sub, common) -> None:
    d = sub.add_parser('data', parents=[common], help='data sets for training: pack into ArrayRecord shards')
    dsub = d.add_subparsers(dest='data_cmd', required=True, help='pack: SRC into ArrayRecord shards')
    s = dsub.add_parser('pack', parents=[common], help='SRC (image folder, CIFAR archive, datasets folder or Parquet) '
                        'into ArrayRecord shards + dataset.json in DST',
                        description='Each record is the image file\'s bytes as stored (never re-encoded; CIFAR: raw '
                        'pixels) and its label, split by split in the order training reads SRC, so a run from DST '
                        'equals the run from SRC. DST/dataset.json (class names, counts, shards, sha256) is written '
                        'last: a pack that is stopped leaves no data set. Unreadable images are left out and named.')
    s.add_argument('src', help='image folder (root/<class>/*.jpg, or train/ and val/), CIFAR-10/100 archive or '
                   'directory, datasets save_to_disk folder, .parquet file or folder of them')
    s.add_argument('dst', help='output folder (local or a URL etils.epath writes, e.g. gs://bucket/data)')
    s.add_argument('--shards', type=int, default=0,
                   help='shards per split (default 0: one per 10,000 images, at least one)')
    s.add_argument('--force', action='store_true', help='replace the packed data set already in DST')
    s.add_argument('--dataset', choices=('folder', 'cifar10', 'cifar100', 'hf'),
                   help='what SRC is (default: detected)')
    s.add_argument('--val-split', type=float, default=0.2,
                   help='validation share of a folder without train/ and val/, or of a one-split hf set, by '
                   'WZMIAOMIAO\'s rule as training uses (default 0.2)')
    s.add_argument('--image-column', default='image', help='hf: the image column (default image)')
    s.add_argument('--label-column', default='label', help='hf: the label column (default label)')
    s.add_argument('--threads', type=int, default=0, help='threads that read and check images (default: the cores)')
    s.set_defaults(fn=cmd_pack)


def cmd_pack(a) -> int:
    from vit_train.errors import TrainError
    from vit_train.pack import pack
    if a.shards < 0:
        raise ConversionError(f'--shards wants an integer >= 0, got {a.shards}')
    if not 0 <= a.val_split < 1:
        raise ConversionError(f'--val-split wants a fraction in [0, 1), got {a.val_split}')
    try:
        m = pack(a.src, a.dst, shards=a.shards, force=a.force, kind=a.dataset, val_split=a.val_split,
                 image_column=a.image_column, label_column=a.label_column, threads=a.threads)
    except TrainError as e:
        raise ConversionError(str(e)) from None
    counts = ', '.join(f'{k} {v["count"]} in {len(v["shards"])} shard(s)' for k, v in m['splits'].items())
    print(f'packed {a.src} ({m["origin"]}, {len(m["class_names"])} classes): {counts}'
          + (f'; {len(m["skipped"])} unreadable image(s) left out' if m['skipped'] else '') + f' -> {a.dst}')
    return 0
