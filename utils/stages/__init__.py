"""What each stage does with a model, a store and a split's concepts."""
