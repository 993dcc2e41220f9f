"""Generated reasoning problems and the held-out scoring windows built from them."""
