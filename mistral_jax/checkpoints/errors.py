"""The one error type for unreadable or inconsistent checkpoints (a subclass of ValueError)."""


class CheckpointError(ValueError):
    """A checkpoint is missing a file or tensor, has an unexpected one, or a shape that does not fit."""
