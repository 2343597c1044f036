"""The HTTP face of flow-compress (FastAPI) and the ``flow-compress`` command line.

Nothing in this package imports torch, directly or through the library: the API validates
with the library's torch-free modules (config, schema, errors, registry, refs) only.
"""
