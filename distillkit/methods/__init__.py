"""The distillation methods' own machinery, beside the losses they train with: SLaM's α
estimator, weighted distillation's weights, L2T-DLN's loss network, the learned (coordinate
LSTM) optimizer and the KD-Zero distiller search."""
