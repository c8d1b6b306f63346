"""Evaluation and outputs: metrics (mIoU), inference of trained models, pictures and the
mmsegmentation export."""
