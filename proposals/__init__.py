"""Region proposals: coarsened selective search, the MultiBox network, merging and recall tools.

Imports go one way. ``proposals`` imports nothing of the project but itself (third-party libraries only): MultiBox
takes its trunk and input transform as modules, which the bundle code in ``detector`` builds. ``eval`` imports
nothing of the project either; ``detector`` may import ``proposals`` and ``eval``; ``service`` may import all
three; nothing imports ``service``. ``tests/test_layering.py`` checks this.
"""
