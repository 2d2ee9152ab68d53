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
