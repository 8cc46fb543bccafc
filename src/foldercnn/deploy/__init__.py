"""Stage 5, deployment: classify files (`foldercnn predict`) and serve a model (`foldercnn serve`)."""
