class TrainError(Exception):
    """Bad input or an impossible request. The message is one line naming the flag, file or value at fault."""


class NonFiniteLoss(TrainError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""
