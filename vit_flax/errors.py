"""The models' one error type for bad input."""


class ModelConfigError(ValueError):
    """A configuration or an input a model cannot take (heads that do not divide the width, an unknown pooling,
    an image of the wrong shape): a one-line message naming the field or shape, raised when the model is set up
    or called. A ValueError, as before; the CLI reports it as bad input (exit 1), not as an internal error."""
