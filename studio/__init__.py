"""Residuals Studio, the Gradio Space: what a shared host needs around residuals_core."""
