"""The shapes world: a miniature Stable Diffusion world small enough to train on two CPU cores."""
