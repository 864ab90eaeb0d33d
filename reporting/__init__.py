"""What a run reports beyond its metrics: the evaluation report, TensorBoard, augmentation previews."""
