"""ACME's family for flow-compress, written as the README's "Extending flow-compress" shows:
the names it builds (here from ACME's own code, ``custom_models``) and its stage-2 rule.
Torch-free at import, so the API can load it to validate names."""

from __future__ import annotations

from typing import Any

from flow_compress.arch import BlockRule, Family, custom_models, register_family


def tinynet(*, num_classes: int, in_chans: int, input_size: int) -> Any:
    from acme_models.nets import TinyNet

    return TinyNet(num_classes, in_chans)


def _residual(m: Any) -> tuple[str, str] | None:
    from acme_models.nets import Residual

    return ("identity", "body") if isinstance(m, Residual) else None


register_family(
    Family(
        name="acme",
        architectures=custom_models("acme", default_input_size=32, acme_tinynet=tinynet),
        small="acme_tinynet",
        block_rules=(BlockRule("acme-residual", _residual),),  # type: ignore[arg-type]
    )
)
