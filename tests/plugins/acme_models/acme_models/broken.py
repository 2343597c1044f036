"""A plug-in with a bug: flow-compress logs and names it, and loads the others."""


def register() -> None:
    raise RuntimeError("acme_broken: the model zoo server is unreachable")
