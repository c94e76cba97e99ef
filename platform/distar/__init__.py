"""distar: post-train one-step text-to-image generators toward human preference with Diff-Instruct*."""

__version__ = "0.1.0"
