"""Text for LaTeX: the density curves of stage 4 as ``filecontents*`` blocks (one ``x y`` line per point), which
a pgfplots figure reads with ``\\addplot table {name.dat}``."""


def filecontents_block(name, xs, ys):
    """LaTeX ``filecontents*`` block with one ``x y`` line per point."""
    lines = [f"\\begin{{filecontents*}}{{{name}.dat}}"]
    lines += [f"{x} {y}" for x, y in zip(xs, ys)]
    lines.append("\\end{filecontents*}")
    return "\n".join(lines) + "\n"
