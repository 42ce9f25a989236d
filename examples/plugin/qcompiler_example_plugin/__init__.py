"""An example qcompiler plugin distribution.

It registers one pass, ``fold-scalar-mul-div`` (:class:`~qcompiler_example_plugin.fold_scalar.FoldScalarMulDivPass`),
in the entry-point group ``qcompiler.passes``. This ``__init__`` stays import-free so that importing the package is
cheap; the pass module is imported only when qcompiler loads the pass.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
