"""Helpers shared by the tests, one module per concern; import each name from the module that owns it."""
