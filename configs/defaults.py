"""The defaults of each command, used when no ``--config`` is given.

``e2rnas <command> --config.FIELD=VALUE`` without ``--config`` starts from
the command's default config (the paper's settings, `config_lib`):

    e2rnas search --config.epochs=10 --workdir=runs/s   # search_config()

Variants: ``search``, ``train``, ``reproduce``, ``sweep`` (the factories
``config_lib.<variant>_config``).
"""

from e2rnas_tf import config_lib

VARIANTS = ("search", "train", "reproduce", "sweep")


def get_config(variant="search"):
    if variant not in VARIANTS:
        raise ValueError(f"Expected a variant in {list(VARIANTS)}. "
                         f"Received: {variant!r}")
    c = getattr(config_lib, f"{variant}_config")()
    c.lock()
    return c
