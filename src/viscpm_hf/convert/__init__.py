"""Conversion of the released VisCPM checkpoints (see `viscpm-convert --help`)."""
