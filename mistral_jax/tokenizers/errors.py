"""UnsupportedTokenizer: a tokenizer or chat format this package does not implement (a UserError)."""

from mistral_jax.errors import UserError


class UnsupportedTokenizer(UserError, NotImplementedError):
    """A valid tokenizer file of a kind not supported here; a NotImplementedError, as it used to be."""
