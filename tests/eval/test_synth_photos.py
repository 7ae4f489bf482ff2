"""eval.synth_photos: the scikit-image photos and their cut-outs."""

import socket

from eval.synth_photos import CLASSES, load_sources


def test_photos_load_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the synthetic set must not download anything")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    src = load_sources.__wrapped__()
    assert set(src.classes) == {c.wnid for c in CLASSES}
    assert all(cut.alpha.max() == 255 and cut.alpha.min() == 0 for cuts in src.classes.values() for cut in cuts)
