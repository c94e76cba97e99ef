"""MLflow for distar: where runs go (`store`), what a training run records (`runs`), and the
finished generator as a registered pyfunc model (`registry`)."""
