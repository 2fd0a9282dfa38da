"""Channel disentanglement for CNN interpretability (Hesse et al., CVPRW 2025).

One idea per module: ``models`` (model and layer loading), ``data`` (ImageFolder and transform),
``attribution`` (activation x gradient, patch sums), ``store`` (stage-1 arrays and manifest),
``importances`` (stage 1), ``similarities`` (stage 2), ``disentangle`` (stage 3 surgery),
``evaluation`` (stage 4 numbers), ``featurevis`` (MACO feature visualizations), ``plots``, ``cli`` (shared flags and error handling),
``fileio`` (atomic writes).
"""
