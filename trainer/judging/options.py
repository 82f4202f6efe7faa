"""The judging half's option defaults and choices, in a module that imports nothing heavy:
the commands (evaluate, predict, fuse, report, lesion_heat) read them to answer --help and
option errors before torch is loaded. The modules that use them import them from here."""

from __future__ import annotations

CAM_LAYER = "layer3"  # the ResNet stage the class-activation maps are taken from
CAM_TARGETS = ("referable", "predicted", "expected")
CAM_TARGET = "referable"
CAM_DIR = "cam"  # predict --explain, evaluate --explain: OUT/cam/<name>.png
FUSION_KEY = "fusion"  # best.pt's entry for the both-eyes fusion head
HIDDEN = 256  # the fusion head's hidden width
GALLERY = 12  # photographs in the run page's gallery
