"""Inputs and their file formats: datasets and split lists, image loading, label PNG and CAM file
I/O, segmentation training samples, synthetic scenes and the demo photos."""
