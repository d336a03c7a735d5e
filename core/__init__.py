"""The bottom layer: what every package uses and nothing of the project's is imported by.

Errors and the CLI wrapper (:mod:`core.errors`), atomic files with the user's umask (:mod:`core.files`),
image reading (:mod:`core.image_io`), the hloc files (:mod:`core.io`: pairs.txt, features.h5, matches.h5),
pose and camera files (:mod:`core.poses`, :mod:`core.cameras`, :mod:`core.par_files`), two-view geometry
(:mod:`core.geometry`) and small shared infrastructure (caches, file-state stamps, devices, COLMAP models).
"""
