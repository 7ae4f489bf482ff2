"""The member networks: the paper's GoogLeNet (``googlenet``, Table 1), EfficientNet-Lite (``efficientnet_lite``),
what a bundle may hold of them (``members``), the input transform (``transform``) and Table 1's counts
(``summary``)."""
