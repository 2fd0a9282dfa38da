"""A split's concepts behind one interface (base), by classes or by clusters."""
