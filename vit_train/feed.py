"""Keeping the devices fed: batches put on the devices ahead of the step that uses them, and the time each step
waited for its batch.

`DeviceFeed(it, put, depth)` holds up to `depth` batches already handed to `put` (sharding.global_batch: an
asynchronous transfer); the loop takes one, dispatches its step, then calls `fill()`, so batch s+1 is read and
travels while step s computes (jax dispatch is asynchronous). Its iterator state is that of the next
batch the loop has *not* taken (the state grain's iterator had before producing it), so a checkpoint saved
after step s resumes at batch s+1 however far the feed has read ahead. grain's orbax handler saves an iterator
that is not its own through `get_state() -> bytes` / `set_state(bytes)`; both are JSON of grain's state.
"""
import collections
import json
import time


class DeviceFeed:
    def __init__(self, it, put, depth: int = 2):
        self.it, self.put, self.depth = it, put, max(0, depth)
        self.ring = collections.deque()     # (grain state before the batch, device batch, seconds it took)
        self.last_wait = 0.0

    def _pull(self):
        state = self.it.get_state() if hasattr(self.it, 'get_state') else None
        t0 = time.perf_counter()
        local = next(self.it)
        took = time.perf_counter() - t0
        self.ring.append((state, self.put(local), took))

    def __iter__(self):
        return self

    def __next__(self):
        """The next device batch. `last_wait`: the seconds grain's iterator kept the loop waiting for it (its
        worker threads/processes work ahead: ~0 when the pipeline keeps up, the shortfall when it does not)."""
        if not self.ring:
            self._pull()
        _, batch, self.last_wait = self.ring.popleft()
        return batch

    def fill(self) -> None:
        """Read ahead to `depth` batches: call it after dispatching a step, so it overlaps the computation."""
        while len(self.ring) < self.depth:
            self._pull()

    # grain's checkpoint handler (an iterator that is not a grain DatasetIterator: bytes in, bytes out)
    def get_state(self) -> bytes:
        state = self.ring[0][0] if self.ring else self.it.get_state()
        return json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        self.ring.clear()
        self.it.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        if hasattr(self.it, 'start_prefetch'):
            self.it.start_prefetch()

    def close(self) -> None:
        self.ring.clear()
        if hasattr(self.it, 'close'):
            self.it.close()
