"""Models beyond a plain timm classifier (built by :func:`ddp_train.recipe.build_model`)."""
