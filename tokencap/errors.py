"""The exceptions tokencap raises, and the exit codes they map to."""

# Exit codes are a stable interface: scripts and CI jobs branch on them.
EXIT_USAGE = 2
EXIT_CAPPED = 86
EXIT_INTERNAL = 1


class TokencapError(Exception):
    """Base class for every error tokencap raises on purpose."""

    exit_code = EXIT_INTERNAL


# --- Configuration ------------------------------------------------------------------------


class ConfigError(TokencapError):
    """An option, environment variable or file has an invalid value."""

    exit_code = EXIT_USAGE


class ConfigFileError(ConfigError):
    """A budget file cannot be read or parsed, or has invalid keys or values.

    `problems` holds one line per problem, each naming the file, the line and the key.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class CommandNotFound(ConfigError):
    """The command to wrap does not exist or is not executable."""


# --- Running ------------------------------------------------------------------------------


class ProxyStartError(TokencapError):
    """The embedded proxy could not start listening."""


class LedgerError(TokencapError):
    """The SQLite ledger could not be opened, migrated or written."""


# --- Upstream -----------------------------------------------------------------------------


class UpstreamProtocolError(TokencapError):
    """A provider response could not be parsed as the wire format its API promises."""
