"""The atlas: a static site of a layer's split channels, opened from ``file://`` (no server, no network).

``collect`` reads what stages 3 and 4 wrote into rows, ``html`` builds the pages as strings, ``write`` copies
the pictures and files beside the pages and renames the finished folder into place (``write_atlas``).
``python -m utils.atlas --results OUT --store STORE --atlas DIR`` writes it from the command line.
"""
