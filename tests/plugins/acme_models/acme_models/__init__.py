"""ACME's vision models (a flow-compress plug-in used by the tests)."""
