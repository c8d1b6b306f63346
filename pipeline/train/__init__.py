"""Segmentation training: the loop, its losses and the online label makers."""
