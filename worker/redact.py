"""Failure messages as clients see them: no server paths, nothing listed from server folders.

The library's messages are written for someone at the machine (``image folder /srv/x holds
fewer than two classes``, ``cifar10 not found under /home/svc/.cache/...``). A job's error is
read by clients, who may name only what the service lets them reference, so before a message
is stored on a job:

- the paths the job was given are put back as the client named them (the dataset the client
  referenced, "the uploaded dataset", "the weights");
- a dataset error about a server-side dataset (not the client's own upload) is replaced by a
  fixed sentence: the library's detail can list the folder's entries (torchvision's "Found no
  valid file for the classes ..."), which would let a client list server folders;
- any other absolute path left becomes ``<server path>``.

The worker's log keeps the original message for the operator.
"""

from __future__ import annotations

import re

from worker.jobs import JobPayload
from worker.storage import Storage

SERVER_PATH = "<server path>"
# An absolute (or home-relative) path: starts a token, runs to whitespace, a quote or a
# delimiter. URLs (``https://``) are left alone by the look-behind on ``:`` and ``/``.
_PATH = re.compile(r"(?<![\w.:/~-])~?/[^\s'\"`,;()\[\]{}<>]*")
_DATASET_CODES = frozenset({"invalid_dataset", "dataset_not_found"})


def redact_paths(text: str, known: dict[str, str] | None = None) -> str:
    """``text`` with each ``known`` server path replaced by its public name (longest first)
    and every other absolute path by ``<server path>``."""
    for server, shown in sorted((known or {}).items(), key=lambda kv: -len(kv[0])):
        if server:
            text = text.replace(server, shown)
    return _PATH.sub(SERVER_PATH, text)


def public_message(code: str, message: str, payload: JobPayload | None, storage: Storage) -> str:
    """The message stored on a failed job (see the module docstring)."""
    known: dict[str, str] = {}
    if payload is not None:
        client_ref = payload.config.dataset
        if payload.dataset_path is not None:
            uploaded = storage.uploads(payload.job_id) / "dataset"
            server_root = payload.dataset_path.partition(":")[2]
            if code in _DATASET_CODES and not server_root.startswith(str(uploaded)):
                reason = (
                    "it was not found"
                    if code == "dataset_not_found"
                    else "it is not a dataset "
                    "this server can read (an image folder needs one folder of images per "
                    "class, at least two, optionally under train/ with val/ or test/)"
                )
                return f"dataset {client_ref!r} could not be read: {reason}"
            known[str(uploaded)] = "the uploaded dataset"
            known[server_root] = client_ref.partition(":")[2] or client_ref
        elif code in _DATASET_CODES and ":" not in client_ref:
            # A built-in name read from the server's cache (cifar10, ...): where it was
            # looked for is the server's business.
            reason = (
                "it was not found on this server"
                if code == "dataset_not_found"
                else ("it could not be read")
            )
            return f"dataset {client_ref!r} could not be read: {reason}"
        if payload.weights:
            known[payload.weights] = "the weights"
    known[str(storage.root)] = SERVER_PATH
    return redact_paths(message, known)
