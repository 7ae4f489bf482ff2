"""GoogLeNet and EfficientNet-Lite members, model bundles, the input transform, region warping, the ensemble,
R-CNN detection, whole-image classification and their training.

Imports go one way: ``detector`` may import ``proposals`` (a detector takes proposals; the bundle code builds
MultiBox's trunk here) and ``eval`` (the class tables), never ``service``. ``proposals`` and ``eval`` import
nothing of the project; ``service`` may import everything; nothing imports ``service``. ``tests/test_layering.py``
checks this.
"""
