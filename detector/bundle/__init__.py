"""The on-disk model bundle: ``model.json`` and one safetensors file per member (``format``), the importers that
make bundles of torchvision's and EfficientNet-Lite's ImageNet weights and merge them (``importers``), the MultiBox
network beside the members (``multibox``) and the int8 models made for them (``int8``, verified at load).

The names most callers need are here: ``load_bundle``, ``save_bundle``, ``resolve_bundle``, ``Bundle``,
``BundleError``."""

from detector.bundle.format import Bundle, BundleError, Preprocess, load_bundle, save_bundle
from detector.bundle.importers import resolve_bundle

__all__ = ["Bundle", "BundleError", "Preprocess", "load_bundle", "resolve_bundle", "save_bundle"]
