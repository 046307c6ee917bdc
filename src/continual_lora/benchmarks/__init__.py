"""Benchmarks: embedded image domains (mtil-mini) and the small pretrained CLIP they start from."""
