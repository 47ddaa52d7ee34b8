"""Built-in PRS-Med plugins, installed under the import name ``prsmed_plugins``.

One subpackage per component family; each registers its components through the ``prsmed.plugins`` entry-point
group, exactly as a third-party plugin does.
"""
