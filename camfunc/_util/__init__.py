"""Leaf utilities with no camfunc imports: atomic file writes, image reading, progress bars,
Gaussian kernels, where host reads are free."""
