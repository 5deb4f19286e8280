"""The built-in rules of lowrank_opt, installed as ``lowrank_opt_plugins``.

Each module holds one rule and is registered in the ``lowrank_opt.rules`` entry-point group,
the same way a third-party package registers its own.
"""
