"""DenseNet: dense layers whose growth channels are concatenated into every later input.

Stage 1 prunes the bottleneck width inside each dense layer and the growth channels, which
DepGraph maps through every ``torch.cat`` that carries them. Stage 2 has no candidates
(``stage2="never"``): removing a dense layer removes its growth channels from every later
concatenation — a change to all later layers' inputs, not a replacement — and a dense layer's
output never matches its input shape, so no identity replacement exists.
"""

from __future__ import annotations

from flow_compress.arch import Family, register_family, torchvision_models

register_family(
    Family(
        name="densenet",
        architectures=torchvision_models("densenet", "densenet121", "densenet169"),
        small="densenet121",
        paper="densenet121",
        stage2="never",
    )
)
