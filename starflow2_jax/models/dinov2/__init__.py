"""DINOv2 (with and without registers) in Flax: a port of the transformers model for patch
features, its config and presets, image loading, and features of image files to .npy."""
