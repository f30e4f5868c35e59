"""Helpers shared by the tests' tiny configs."""


def set_fields(config, overrides):
    """Sets dotted fields, ``{"arch.lr": 0.1}`` -> ``config.arch.lr = 0.1``;
    returns ``config`` (unlock a locked config first)."""
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config
