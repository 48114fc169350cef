"""Small helpers shared by every stage: output folders, image grids and plots, metrics logs."""
