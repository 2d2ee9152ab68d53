"""`.safetensors`: a JSON header and raw little-endian tensors, read as memory-mapped views, written streamed."""
import json
import struct
from typing import Dict, Optional

import numpy as np

from . import mapped
from ..errors import ConversionError
from .durable import atomic_output
from .mapped import release


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    return mapped.read_safetensors(str(path))



_SAFETENSORS_CODES = {v: k for k, v in mapped.SAFETENSORS_DTYPES.items()}


def write_safetensors(state: Dict[str, np.ndarray], path: str, force: bool = False,
                      metadata: Optional[Dict[str, str]] = None) -> None:
    """The safetensors format, streamed (the library's writers first copy every tensor into one buffer);
    `metadata`: strings added to the header's `__metadata__` beside {'format': 'pt'}."""
    header, offset = {'__metadata__': {'format': 'pt', **(metadata or {})}}, 0
    names = sorted(state, key=lambda k: (-np.dtype(state[k].dtype).itemsize, k))   # keeps every tensor aligned
    for k in names:
        dtype = np.dtype(state[k].dtype).newbyteorder('=')
        if dtype not in _SAFETENSORS_CODES:
            raise ConversionError(f'{path}: tensor {k!r}: safetensors cannot hold dtype {dtype}')
        n = state[k].size * dtype.itemsize
        header[k] = {'dtype': _SAFETENSORS_CODES[dtype], 'shape': list(state[k].shape), 'data_offsets': [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(',', ':')).encode()
    blob += b' ' * (-len(blob) % 8)
    with atomic_output(path, force) as tmp, open(tmp, 'wb') as f:
        f.write(struct.pack('<Q', len(blob)) + blob)
        for k in names:
            a = state[k]
            if a.dtype.byteorder == '>' or (a.dtype.byteorder == '=' and not np.little_endian):
                a = a.astype(a.dtype.newbyteorder('<'))
            for chunk in mapped.iter_chunks(a):
                f.write(chunk)
            release(state[k])
