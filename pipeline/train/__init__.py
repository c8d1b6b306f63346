"""Segmentation training: the loop (``loop.train``) and its steps, the config, the losses and the online
label makers (``online``)."""
