import contextlib
import signal


class TrainError(Exception):
    """Bad input or an impossible request. The message is one line naming the flag, file or value at fault."""


class NonFiniteLoss(TrainError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run stops after its in-flight save; exit status 128 + the signal's number."""

    def __init__(self, signum: int, message: str = ''):
        super().__init__(message or f'interrupted by {signal.Signals(signum).name}')
        self.signum, self.code = signum, 128 + signum

    def __str__(self):
        return self.args[0]


_deferred = {'depth': 0, 'pending': None}


def on_signal(signum, frame):
    """The SIGINT/SIGTERM handler `main` installs: raise Interrupted, or only note the signal while a
    `signals_deferred` block runs. A second signal ends the process at once."""
    signal.signal(signum, signal.SIG_DFL)
    if _deferred['depth']:
        _deferred['pending'] = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_deferred():
    """Hold off Interrupted until the block ends: an exception raised inside orbax's save, between its
    temporary directory and the background commit, would strand a `*.orbax-checkpoint-tmp` directory that
    no wait can finish."""
    _deferred['depth'] += 1
    try:
        yield
    finally:
        _deferred['depth'] -= 1
        if not _deferred['depth'] and _deferred['pending'] is not None:
            signum, _deferred['pending'] = _deferred['pending'], None
            raise Interrupted(signum)
