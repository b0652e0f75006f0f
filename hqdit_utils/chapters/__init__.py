"""What the book's chapters use: layer-level analyses, tables, exercises, plotting, trajectories."""
