"""Exception types: every user-facing failure says what is wrong, where, and what was expected."""


class MTLVisionError(Exception):
    """Base class for errors caused by user input (config, data, checkpoints)."""


class ConfigError(MTLVisionError):
    """A config key or value is unknown or invalid."""


class DataError(MTLVisionError):
    """A dataset file, image or label is missing, unreadable or out of range."""


class CheckpointError(MTLVisionError):
    """A checkpoint is missing, unreadable or does not match the config."""


class TrainingDiverged(MTLVisionError):
    """A task loss became NaN or infinite; the last good checkpoint is kept."""
