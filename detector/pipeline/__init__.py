"""From an image to detections: region warping (``warp``), the ensemble (``ensemble``), the DET-head mapping
(``det_head``), the scorers (``scoring``: warped regions, the paper's; ``shared_trunk``: one trunk pass per image),
the ``Detector`` itself (``detector``) and whole-image classification (``classify``)."""
