"""The application layer: the `vit-flax` command (`cli`), `make demo` (`demo`), and what only they use
(`predict`, `parity`). It sits above `converters` and `vit_train`; nothing below imports it."""
