"""Configs as code: each module's `get_config(variant)` returns a locked
`ml_collections.ConfigDict`; its docstring gives the command it is for and
what that should produce.

Shipped inside the package as ``e2rnas_tf.configs``: ``--config=NAME``
(e.g. ``--config=search_demo`` or ``--config=reproduce:cpu``) selects one
from any installation, ``--config=path/to/file.py`` any file.
"""
