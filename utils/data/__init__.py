"""Image folders, transforms, loaders, the one scan up to a layer, decoding, class folders to outputs."""
