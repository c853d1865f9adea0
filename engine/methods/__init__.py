"""Editing methods (DESIGN §8): one module per method, registered by name.

    from massedit.methods import EditMethod, register_method

    @register_method
    class MyMethod(EditMethod):
        name = "my-method"
        def compute(self, editor, requests, templates, solvers, timings, batch_size): ...

`MassEditor.edit(requests, method="my-method")` and `massedit edit --method my-method` then use it;
neither knows the methods by name. Importing this package registers the built-in methods.
"""
from massedit.methods.base import METHODS, EditMethod, get_method, method_names, register_method
from massedit.methods import alphaedit, memat, memit, rome  # noqa: E402,F401 - registers the built-in methods

__all__ = ["METHODS", "EditMethod", "get_method", "method_names", "register_method"]
