"""The diffusers pipelines of the project: `viscpm_paint` (VisCPM-Paint, text to image with an LLM encoder)."""
