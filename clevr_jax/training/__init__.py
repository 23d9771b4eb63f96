"""Training: `train.train_and_evaluate`, the jitted step and its optimizer,
the train state, the batch fields derived on the devices, the losses, and the
orbax checkpoints that training writes and evaluation restores."""
