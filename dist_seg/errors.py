"""The one exception type a user sees as a single line (see cli.main)."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong, which file, what to do."""


class DataError(UserError):
    """A data set, shard or manifest that cannot be used as it is."""
