"""Domain tasks: data, models and LightningModules, one folder per domain.

Shared plumbing lives here (``build``: objects from ``_target_`` dicts; ``optim``: optimizers
and schedulers from config; ``freezing``: fine-tuning policies; ``plotting``). Importing this
package is light: Lightning is imported only by the ``module``/``data`` files that need it.
"""
