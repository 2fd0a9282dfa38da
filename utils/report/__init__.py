"""What the user sees: plots, printed tables and text, LaTeX blocks."""
