"""What a user runs, one module per verb: train, cv, evaluate, compare, registry (with the
model card), and tuning/. Each wires data, models, training and evaluation to tracking."""
