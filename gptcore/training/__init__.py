"""Training: the loop (:mod:`.loop`), its optimizer and schedule, the weight average, the
resume state, torchrun, the device and precision, and the metrics a run reports."""
