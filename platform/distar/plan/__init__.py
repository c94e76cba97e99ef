"""The memory plan of a run before anything starts: which architectures its roles hold
(architectures), the activation peak of each role's work measured on fake tensors (peaks), and
ZeRO's accounting and whether each role fits a GPU (fit). jobs/plan.py prints it; jobs/train.py checks it."""
