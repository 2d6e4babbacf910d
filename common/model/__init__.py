"""Models: the Llama-family transformer, quantized and LoRA weights, the HF mapping."""
