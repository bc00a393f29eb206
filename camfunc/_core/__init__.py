"""The core: the :class:`~camfunc.Split` value, targets, map operations, checks, layouts, the
gradients engine, and (above them) capture and the splitter that builds a Split from a model.

Modules import only those before them in this order: split, targets, ops, contrastive,
validate, layout, cut, engine, splitter (``tests/test_architecture.py`` holds it).
"""
