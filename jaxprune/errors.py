"""The one exception type a user sees: it names the problem and the fix."""
import difflib


class UserError(Exception):
    """A bad input (config, file, name, shape). `run.py` prints it as one line."""


class MissingInput(UserError):
    """An input that is not on disk (yet): a data set not prepared, a weights file not
    downloaded. A run refuses it; a dry run lists it in its plan, so that a config can be
    checked on a machine without its data."""


def closest(name: str, valid, n: int = 3) -> str:
    """A 'did you mean' hint listing the closest valid names."""
    valid = list(valid)
    near = difflib.get_close_matches(name, valid, n=n, cutoff=0.4)
    if near:
        return "did you mean " + " or ".join(repr(v) for v in near) + "?"
    shown = ", ".join(repr(v) for v in valid[:8])
    return f"valid names: {shown}{', ...' if len(valid) > 8 else ''}"


def counted(n: int, noun: str) -> str:
    """"1 table", "2 tables": a count and its noun for a message (plural with an s)."""
    return f"{n} {noun}{'s' * (n != 1)}"
