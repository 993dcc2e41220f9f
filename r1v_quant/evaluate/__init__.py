"""Quality: perplexity / KLD windows, benchmark loaders and scoring, paired statistics, the release gate."""
