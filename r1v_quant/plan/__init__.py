"""Memory and time arithmetic: the memory model, this machine's roofline, and `plan`'s configurations."""
