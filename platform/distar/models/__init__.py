"""Model families: loading diffusers folders, text conditioning, denoisers and the one-step generator."""
