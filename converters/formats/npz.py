"""`.npz`: numpy's zip of `.npy` members, read as memory-mapped views (plain numeric arrays only: no
pickled object runs) and written as `np.savez` writes it, streamed."""
import zipfile
from typing import Dict

import numpy as np

from . import mapped
from .durable import atomic_output
from .mapped import release


def read_npz(path: str) -> Dict[str, np.ndarray]:
    return mapped.read_npz(str(path))



def write_npz(arrays: Dict[str, np.ndarray], path: str, force: bool = False, comment: bytes = b'') -> None:
    """What `np.savez` writes (stored zip64 members `KEY.npy`), streamed array by array; `comment` the zip
    archive's comment (np.load and every .npz reader ignore it: converters/model_fields.py records there)."""
    with atomic_output(path, force) as tmp, open(tmp, 'wb') as f:
        with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED, allowZip64=True) as z:
            z.comment = comment
            for k, v in arrays.items():
                with z.open(k + '.npy', 'w', force_zip64=True) as m:
                    np.lib.format.write_array(m, np.asarray(v, order='C'), allow_pickle=False)
                release(v)
