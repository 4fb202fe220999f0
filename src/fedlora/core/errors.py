"""The exceptions fedlora raises; each message says what was wrong and what to do."""


class FedloraError(Exception):
    """Base class of every error fedlora raises on purpose."""


class ConfigError(FedloraError, ValueError):
    """A configuration value is missing, misspelt or invalid."""


class DataError(FedloraError):
    """A dataset or corpus is missing, empty or malformed."""


class CheckpointError(FedloraError):
    """A checkpoint or adapter file is missing, corrupt or does not fit the model."""


class ClientFailure(FedloraError):
    """A client raised, timed out or disconnected during a round."""
