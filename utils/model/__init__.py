"""Loading a model and finding a layer, the layer tap, the whole-layer network."""
