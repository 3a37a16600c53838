"""Training a retriever: the training data, hard negatives, distillation teachers and their
scores file, the losses and DPR fine-tuning; with the `retroflow` commands that run them."""
