"""Helpers shared by the tests (tiny real models, ...); not part of the library."""
