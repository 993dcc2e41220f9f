"""Plumbing every stage shares: one-line user errors, atomic outputs, Ctrl-C handling, NaN checks, output
folders, device resolution, Hugging Face Hub resolution. Imports nothing else from r1v_quant."""
