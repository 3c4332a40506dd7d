"""Command-line helpers: download, convert, fetch the default model, perplexity, quality sweep."""
