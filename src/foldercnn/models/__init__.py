"""Stage 2, the models: the registry of architectures (what each can do), input preprocessing, the model file
(safetensors + validated JSON metadata) and batched inference on a loaded model."""
