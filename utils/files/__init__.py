"""Every file name (names), atomic writes and locks, the stage-1 store, the quantitative registry."""
