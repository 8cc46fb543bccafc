"""Stage 3, training: recipes, the training loop, transfer learning, and the folder -> run folder job."""
