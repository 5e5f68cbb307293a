"""Method arguments written in one string: `"name=value:name=value"`.

The apps take a method's arguments this way in one flag or configuration
name (`compare_methods --configs tr0.5+pcgrad:every_n_steps=8`,
`train_omniglot --sharing-options proposal=threshold`). Values are Python
literals where they parse as one (`8`, `0.3`, `None`, `False`), else strings.
"""

import ast


def parse_options(text, name):
    """`"every_n_steps=8:seed=1"` -> `{"every_n_steps": 8, "seed": 1}`.

    Args:
        text: the options; empty gives `{}`.
        name: what they came from, for the error message (e.g. the
            configuration name).

    Returns:
        A dict of the options.

    Raises:
        ValueError: an option that is not `<argument>=<value>`.
    """
    out = {}
    for item in filter(None, text.split(":")):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise ValueError(
                f"{name}: bad option {item!r}; write each option as <argument>=<value>, options "
                "separated by ':' (e.g. every_n_steps=8:seed=1)."
            )
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out
