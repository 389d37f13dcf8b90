"""The one exception type for bad user input.

Anything a user can fix (a spec field, a file, a model name) raises ``ConfigError``;
the CLI turns it into a one-line message and exit code 2. It subclasses ``ValueError``
so library callers can catch it the ordinary way.
"""


class ConfigError(ValueError):
    """Bad input that the user can fix; the message names the field or file and the fix."""
