"""ILSVRC detection and classification scoring, and every file format of detections, ground truth and
submissions.

``eval`` imports nothing of ours outside ``eval`` (it scores files; ``detector`` and ``service`` import it), so
any file it reads or writes has one owner here, one function per format and direction:

- ``boxes``: the box conventions of the files (ours, the devkit's inclusive ``+1`` integers, COCO ``xywh``) and
  the conversions between them.
- ``parsing``: what every reader shares: lines and whole files read within bounds (its ``MAX_*`` constants),
  JSON with a nesting limit, range checks of values, short excerpts of bad input for messages.
- ``detections``: ``DetectionTable``, the detections of many images as flat arrays, as readers return them and
  writers take them.
- ``records``: our detection JSON lines (``ircnn detect`` records, the CLI and HTTP ``detect`` document): built
  from plain values, written, checked and read.
- ``submission``: the devkit's submission lines ``<image_index> <det_id> <confidence> <xmin> <ymin> <xmax>
  <ymax>``.
- ``coco``: COCO ground-truth JSON and results lists.
- ``annotations``: ILSVRC DET annotation XML, image sets, splits, the blacklist, image names -> imageset indices.
- ``predictions``: any predictions file (submission, JSON lines or COCO), told apart and read.
- ``classes``: the ``cls1000`` and ``det200`` vocabularies.
- ``ilsvrc``: detection mAP, devkit-exact, and its cross-check modes.
- ``classification``: top-1 / top-5 error and its label and prediction files.
- ``plots``: precision-recall plots of a detection result.
- ``synth``: the synthetic detection set on disk (``ircnn data synth``); ``synth_render`` draws its images from
  the photos of ``synth_photos``.
"""
