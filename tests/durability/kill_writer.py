"""Kill a checkpoint writer at random points, many times, and check what is left on disk.

    python tests/durability/kill_writer.py SRC KILLS SEED DST...     (prints one JSON line of counts per DST)

SRC is read once; each trial forks a child that writes one of two versions of it (A: as read, B: every
array + 1) over DST with force=True, and SIGKILLs the child after a random delay within the time a
write takes. After every kill DST must read back as exactly A or exactly B (or be absent, before the
first write ever finished), and at most the killed child's `.vit-flax-*` temporary may be left; the
next write must remove it. Forking after the imports keeps each trial to the write itself.
"""
import json
import os
import random
import signal
import sys
import time

import numpy as np


def checksums(arrays) -> dict:
    return {k: float(np.asarray(v, np.float64).sum()) for k, v in arrays.items()}


def main(src: str, dst: str, kills: int, seed: int) -> dict:
    from converters import formats
    from converters.formats.durable import PREFIX
    fmt = formats.file_format(dst)
    write = {'npz': formats.write_npz, 'torch': formats.write_torch, 'safetensors': formats.write_safetensors}[fmt]
    a = {k: np.array(v) for k, v in formats.read_file(src).items()}
    versions = [a, {k: v + 1 for k, v in a.items()}]
    sums = [checksums(ver) for ver in versions]
    folder = os.path.dirname(os.path.abspath(dst))
    rng = random.Random(seed)

    def temps():
        return [n for n in os.listdir(folder) if n.startswith(PREFIX)]

    def run(version, delay):
        pid = os.fork()
        if pid == 0:
            try:
                write(versions[version], dst, force=True)
                os._exit(0)
            except BaseException:
                os._exit(3)
        if delay is None:
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    if fmt == 'torch':
        import torch  # noqa: F401  (in the parent: a child's time goes to the write, not the import)
    assert run(0, None) == 0, 'an unkilled write failed'
    timings = []
    for _ in range(3):   # the fastest of three: on a loaded machine one timing may be far too long
        t0 = time.perf_counter()
        assert run(0, None) == 0
        timings.append(time.perf_counter() - t0)
    duration = min(timings)
    counts = dict(trials=0, kills=0, old=0, new=0, temp_left=0, max_temps=0, write_seconds=round(duration, 3))
    current = 0
    while counts['kills'] < kills and counts['trials'] < 10 * kills:   # a write may finish before its kill
        i = counts['trials']
        counts['trials'] += 1
        version = 1 - current
        rc = run(version, rng.uniform(0, duration))
        counts['kills'] += rc == -signal.SIGKILL
        got = checksums(formats.read_file(dst))   # raises on a damaged file: the test fails
        if got == sums[current]:
            counts['old'] += 1
        elif got == sums[version]:
            counts['new'] += 1
            current = version
        else:
            raise AssertionError(f'trial {i}: {dst} is neither the old nor the new checkpoint')
        left = temps()
        counts['temp_left'] += bool(left)
        counts['max_temps'] = max(counts['max_temps'], len(left))
    assert run(1 - current, None) == 0
    counts['temps_after_next_write'] = len(temps())
    return counts


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root
    for dst in sys.argv[4:]:
        print(json.dumps(dict(main(sys.argv[1], dst, int(sys.argv[2]), int(sys.argv[3])), dst=dst)), flush=True)
