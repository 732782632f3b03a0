"""Data in: subjects found in a folder, NIfTI files read and checked into model layout, training crops."""
