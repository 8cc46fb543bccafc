"""Stage 1, the data: scan and validate a labelled folder, decode once (cached), split, augment; download and
inspect. Nothing here ever writes into the user's folders."""
