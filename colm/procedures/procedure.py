"""Procedure base: built from a `P/...` scope, linked to models/datasets by scope name, run in its scope.

Running inside the procedure's own scope means configurables called during `run()` (e.g. `@save_results`)
see the procedure's bindings, so `P/EVALUATE/save_results.overwrite = True` takes effect (the original
ran procedures outside any scope, so it never did).
"""

import gin

from colm import registry


class Procedure:
    linking_fields: tuple = ()

    def __init__(self, name, seed=42):
        self.name = name
        self.seed = seed

    def link(self):
        for field in self.linking_fields:
            setattr(self, field, registry.link_field(getattr(self, field)))

    def late_init(self):
        pass

    def run_in_scope(self, *args, **kwargs):
        with gin.config_scope(self.name.split("/")):
            return self.run(*args, **kwargs)

    def run(self, *args, **kwargs):
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__
