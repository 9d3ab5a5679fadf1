"""What the user's files hold: checkpoints in any format, the folds of a cross-validation run, labels."""
