"""The one exception type for bad user input.

The CLI prints a UserError as a single line (`error: ...`) and exits non-zero; anything else is a bug
and keeps its traceback. Messages name the file, config key or value at fault.
"""


class UserError(Exception):
    pass
