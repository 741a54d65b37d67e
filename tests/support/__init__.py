"""Builders shared by the tests: images, tiny diffusers models, snapshot layouts and face weights.

Test modules import from here (``from support.models import tiny_unet``); no test module imports
another. Shared pytest fixtures are in ``tests/conftest.py``.
"""
