"""The one exception type that command-line tools turn into a one-line message."""


class HmamlError(Exception):
    """Bad input a user can fix: the message names the file, key or value at fault.

    The launch scripts catch it, print ``error: <message>`` on one line and exit with status 2,
    so a user never has to read a traceback to learn what to change.
    """
