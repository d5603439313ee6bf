"""Training: GLM's blank-infilling objective, data streaming/packing, the training loop, tokenizer training."""
