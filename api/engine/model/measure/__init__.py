"""What is measured on the user's own images (API_EVAL_DIR): the set, each runtime's agreement and
speed (the precision gate), and the temperature that calibrates the scores."""
