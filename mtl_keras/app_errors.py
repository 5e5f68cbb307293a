"""How an app ends on a user error: one line on stderr and exit status 2, as argparse does.

A user error is one of the exception types the library raises for input it
refuses or an environment it cannot work in (`USER_ERRORS`): a bad value, a
missing or corrupt data folder, a folder that cannot be written, a full
disk, a batch the model's checks refuse, a NaN loss. Its message already names the problem and the fix, so a
traceback would only hide it. Anything else (a `TypeError`, `KeyError`,
`AssertionError`, ...) is a bug and keeps its traceback.

    @exit_on_user_error("train_omniglot")
    def main(argv=None):
        ...

Set `MTL_KERAS_TRACEBACK=1` to see the traceback of a user error too (a
`ValueError` deep inside Keras can be a bug in the caller's code).
"""

import contextlib
import os
import sys

import tensorflow as tf

from mtl_keras.callbacks import NonFiniteLossError
from mtl_keras.input_checks import describe_error

# ValueError covers the library's refusals (input checks, EmptyDataError,
# OmniglotArchiveError); OSError the file system's (OmniglotNotFoundError,
# unwritable folders, a full disk).
USER_ERRORS = (ValueError, OSError, NonFiniteLossError, tf.errors.InvalidArgumentError)
EXIT_STATUS = 2
TRACEBACK_VARIABLE = "MTL_KERAS_TRACEBACK"


def user_error_line(prog, error):
    """What an app prints for `error`: `<prog>: error: <message>`.

    A message the library wrote on several lines (the places searched for
    the data, the URLs) keeps them: the first line names the problem.
    """
    if isinstance(error, OSError) and error.strerror:
        # "[Errno 13] Permission denied: 'x'" reads better as "Permission denied: x".
        text = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    else:
        text = describe_error(error) or type(error).__name__
    return f"{prog}: error: {text.strip()}"


@contextlib.contextmanager
def exit_on_user_error(prog):
    """Context manager and decorator: a user error inside ends the process with one line and status 2.

    Args:
        prog: the app's name, first on the line (as in argparse's errors).

    Raises:
        SystemExit: with status 2, after printing `user_error_line` to stderr.
    """
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        print(user_error_line(prog, e), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STATUS) from e
