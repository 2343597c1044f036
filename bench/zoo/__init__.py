"""The zoo benchmark: every timm and torchvision classifier through the library's steps.

``python -m bench.zoo`` (see ``bench.zoo.sweep``); one model's run is ``bench.zoo.steps``.
"""
