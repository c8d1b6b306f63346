"""The frozen DINOv2 image backbone (``model``: the ViT, its checkpoint loader, intermediates on request)
and random DINOv2 models of the real shapes for tests (``random``)."""
